"""Pareto math on plain numbers: dominance, non-dominated sorting, hypervolume and its contributions come from
``moocore``; what is ours is the crowding tie-break, the knee and the order MO-ASHA promotes in.

Every function takes points as sequences of objective values plus one direction per objective
(``"max"`` or ``"min"``). They are turned into minimisation here, moocore's default, rather than through its
``maximise`` flags: moocore 0.3.2's ``pareto_rank`` reads ``maximise=[False]`` with one objective as maximising.
No Ray, no Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import moocore
import numpy as np

Point = Sequence[float]


def _as_minimisation(points: Sequence[Point], directions: Sequence[str]) -> np.ndarray:
    """``points`` as an (n, objectives) float array to minimise (maximised objectives negated), after checking
    the directions and every point's length; an empty set keeps its column count, which moocore needs."""
    for direction in directions:
        if direction not in ("max", "min"):
            raise ValueError(f"direction must be 'max' or 'min', got {direction!r}")
    for point in points:
        if len(point) != len(directions):
            raise ValueError(f"point {tuple(point)} has {len(point)} values for {len(directions)} objectives")
    signs = np.array([-1.0 if direction == "max" else 1.0 for direction in directions])
    return np.asarray(points, dtype=float).reshape(len(points), len(directions)) * signs


def dominates(a: Point, b: Point, directions: Sequence[str]) -> bool:
    """True when ``a`` is at least as good as ``b`` in every objective and better in one."""
    # keep_weakly: equal points are both kept, so ``b`` is dropped only when ``a`` is strictly better somewhere
    kept = moocore.is_nondominated(_as_minimisation([a, b], directions), keep_weakly=True)
    return not kept[1]


def non_dominated_sort(points: Sequence[Point], directions: Sequence[str]) -> list[list[int]]:
    """Indices grouped into fronts, each in input order: front 0 is non-dominated, front 1 is non-dominated once
    0 is removed... Equal points never dominate each other, so duplicates share a front."""
    if not points:
        return []
    ranks = moocore.pareto_rank(_as_minimisation(points, directions))
    return [np.flatnonzero(ranks == rank).tolist() for rank in np.unique(ranks)]


def pareto_front(points: Sequence[Point], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (duplicates included), in input order."""
    values = _as_minimisation(points, directions)
    if not points:
        return []
    return np.flatnonzero(moocore.is_nondominated(values, keep_weakly=True)).tolist()


def crowding_distance(points: Sequence[Point], directions: Sequence[str]) -> list[float]:
    """NSGA-II crowding distance within one front; the extremes of each objective get infinity."""
    values = _as_minimisation(points, directions)
    distance = [0.0] * len(values)
    if len(values) <= 2:
        return [math.inf] * len(values)
    for objective in range(len(directions)):
        column = values[:, objective].tolist()
        order = sorted(range(len(column)), key=lambda i: column[i])
        low, high = column[order[0]], column[order[-1]]
        distance[order[0]] = distance[order[-1]] = math.inf
        if high == low:
            continue
        for previous, current, following in zip(order, order[1:], order[2:], strict=False):
            distance[current] += (column[following] - column[previous]) / (high - low)
    return distance


def hypervolume(points: Sequence[Point], reference: Point, directions: Sequence[str]) -> float:
    """Volume dominated by ``points`` and bounded by ``reference`` (points not better than the reference in
    every objective add nothing)."""
    values = _as_minimisation(points, directions)
    (bound,) = _as_minimisation([reference], directions)
    return float(moocore.hypervolume(values, ref=bound))


def knee_point(points: Sequence[Point], directions: Sequence[str]) -> int | None:
    """Index of the front member closest to the ideal point once each objective is scaled to [0, 1]:
    the best compromise, where giving up a little of one objective stops buying much of the other."""
    front = pareto_front(points, directions)
    if not front:
        return None
    values = _as_minimisation([points[i] for i in front], directions)
    lows, highs = values.min(axis=0), values.max(axis=0)
    spans = np.where(highs > lows, highs - lows, 1.0)
    distances = np.sqrt((((values - lows) / spans) ** 2).sum(axis=1)).tolist()
    return front[min(range(len(front)), key=lambda k: (distances[k], k))]


def hypervolume_contributions(points: Sequence[Point], reference: Point, directions: Sequence[str]) -> list[float]:
    """What each point alone adds to the hypervolume of ``points``: the volume lost without it. Dominated
    points, duplicates and points outside the reference box add nothing (exactly 0: rounding noise below
    1e-12 of the total is dropped, so such points tie and the next key orders them)."""
    values = _as_minimisation(points, directions)
    (bound,) = _as_minimisation([reference], directions)
    total = float(moocore.hypervolume(values, ref=bound))
    if len(directions) < 2:  # moocore's contributions need two objectives; one is a subtraction per point
        lost = [total - moocore.hypervolume(np.delete(values, i, axis=0), ref=bound)
                for i in range(len(values))]
    else:  # ignore_dominated=False: a dominated point still counts once the point dominating it is gone
        lost = moocore.hv_contributions(values, ref=bound, ignore_dominated=False).tolist()
    return [float(value) if value > 1e-12 * total else 0.0 for value in lost]


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
