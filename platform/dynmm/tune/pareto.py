"""Pareto math on plain numbers: dominance, non-dominated sorting, crowding distance, hypervolume, knee.

Every function takes points as sequences of objective values plus one direction per objective
(``"max"`` or ``"min"``). Internally everything is turned into minimisation. No Ray, no Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = Sequence[float]


def _as_minimisation(points: Sequence[Point], directions: Sequence[str]) -> list[tuple[float, ...]]:
    for direction in directions:
        if direction not in ("max", "min"):
            raise ValueError(f"direction must be 'max' or 'min', got {direction!r}")
    for point in points:
        if len(point) != len(directions):
            raise ValueError(f"point {tuple(point)} has {len(point)} values for {len(directions)} objectives")
    return [tuple(-v if d == "max" else v for v, d in zip(p, directions, strict=True)) for p in points]


def dominates(a: Point, b: Point, directions: Sequence[str]) -> bool:
    """True when ``a`` is at least as good as ``b`` in every objective and better in one."""
    first, second = _as_minimisation([a, b], directions)
    return _dominates(first, second)


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def non_dominated_sort(points: Sequence[Point], directions: Sequence[str]) -> list[list[int]]:
    """Indices grouped into fronts: front 0 is non-dominated, front 1 is non-dominated once 0 is removed...
    Equal points never dominate each other, so duplicates share a front."""
    values = _as_minimisation(points, directions)
    dominated_by_count = [0] * len(values)
    dominating: list[list[int]] = [[] for _ in values]
    for i, a in enumerate(values):
        for j, b in enumerate(values):
            if i != j and _dominates(a, b):
                dominating[i].append(j)
                dominated_by_count[j] += 1
    fronts: list[list[int]] = []
    current = [i for i, count in enumerate(dominated_by_count) if count == 0]
    while current:
        fronts.append(current)
        following = []
        for i in current:
            for j in dominating[i]:
                dominated_by_count[j] -= 1
                if dominated_by_count[j] == 0:
                    following.append(j)
        current = sorted(following)
    return fronts


def pareto_front(points: Sequence[Point], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points, in input order."""
    return non_dominated_sort(points, directions)[0] if points else []


def crowding_distance(points: Sequence[Point], directions: Sequence[str]) -> list[float]:
    """NSGA-II crowding distance within one front; the extremes of each objective get infinity."""
    values = _as_minimisation(points, directions)
    distance = [0.0] * len(values)
    if len(values) <= 2:
        return [math.inf] * len(values)
    for objective in range(len(directions)):
        order = sorted(range(len(values)), key=lambda i: values[i][objective])
        low, high = values[order[0]][objective], values[order[-1]][objective]
        distance[order[0]] = distance[order[-1]] = math.inf
        if high == low:
            continue
        for previous, current, following in zip(order, order[1:], order[2:], strict=False):
            distance[current] += (values[following][objective] - values[previous][objective]) / (high - low)
    return distance


def hypervolume(points: Sequence[Point], reference: Point, directions: Sequence[str]) -> float:
    """Volume dominated by ``points`` and bounded by ``reference`` (points not better than the reference in
    every objective add nothing). Exact, by slicing one objective at a time."""
    values = _as_minimisation(points, directions)
    (bound,) = _as_minimisation([reference], directions)
    inside = [v for v in values if all(x < r for x, r in zip(v, bound, strict=True))]
    return _slice_volume(inside, bound)


def _slice_volume(points: list[tuple[float, ...]], bound: tuple[float, ...]) -> float:
    if not points:
        return 0.0
    if len(bound) == 1:
        return bound[0] - min(p[0] for p in points)
    ordered = sorted(points, key=lambda p: p[-1])
    volume = 0.0
    for i, point in enumerate(ordered):
        upper = ordered[i + 1][-1] if i + 1 < len(ordered) else bound[-1]
        if upper > point[-1]:
            volume += _slice_volume([p[:-1] for p in ordered[: i + 1]], bound[:-1]) * (upper - point[-1])
    return volume


def knee_point(points: Sequence[Point], directions: Sequence[str]) -> int | None:
    """Index of the front member closest to the ideal point once each objective is scaled to [0, 1]:
    the best compromise, where giving up a little of one objective stops buying much of the other."""
    front = pareto_front(points, directions)
    if not front:
        return None
    values = _as_minimisation([points[i] for i in front], directions)
    lows = [min(column) for column in zip(*values, strict=True)]
    highs = [max(column) for column in zip(*values, strict=True)]

    def distance(value: tuple[float, ...]) -> float:
        scaled = [(x - lo) / (hi - lo) if hi > lo else 0.0 for x, lo, hi in zip(value, lows, highs, strict=True)]
        return math.sqrt(sum(s * s for s in scaled))

    return front[min(range(len(front)), key=lambda k: (distance(values[k]), k))]


def hypervolume_contributions(points: Sequence[Point], reference: Point, directions: Sequence[str]) -> list[float]:
    """What each point alone adds to the hypervolume of ``points``: the volume lost without it. Dominated
    points, duplicates and points outside the reference box add nothing (exactly 0: rounding noise below
    1e-12 of the total is dropped, so such points tie and the next key orders them)."""
    total = hypervolume(points, reference, directions)
    lost = [total - hypervolume([p for j, p in enumerate(points) if j != i], reference, directions)
            for i in range(len(points))]
    return [value if value > 1e-12 * total else 0.0 for value in lost]


def selection_order(points: Sequence[Point], directions: Sequence[str], reference: Point | None = None) -> list[int]:
    """Indices best first: by front, then within a front by crowding distance (spread out first), then by
    index. With a ``reference`` point, a front is ordered first by hypervolume contribution: crowding puts
    each front's extremes first, and an extreme beyond the reference (say, cheap but less accurate than
    any expert alone) adds nothing to the hypervolume a study is judged by."""
    order: list[int] = []
    for front in non_dominated_sort(points, directions):
        members = [points[i] for i in front]
        crowding = crowding_distance(members, directions)
        contribution = (hypervolume_contributions(members, reference, directions) if reference is not None
                        else [0.0] * len(front))
        order.extend(i for *_, i in sorted(zip((-v for v in contribution), (-c for c in crowding), front,
                                               strict=True)))
    return order
