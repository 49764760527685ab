"""Random routing: the baseline a learned gate has to beat.

Sending each sample to expert ``i`` with probability ``p_i`` needs no gate and no learning; its expected
quality and compute are the ``p``-weighted means of the experts'. Every mixture of the static experts is
reachable, so the best random router at each compute budget is the upper concave hull of the experts'
(GFLOPs, quality) points. A gated model is worth its gate only above that line.

Plain numbers, two objectives (quality, GFLOPs); no Ray, no Optuna.
"""

from __future__ import annotations

from collections.abc import Sequence

Point = tuple[float, float]  # (gflops, quality), quality oriented so that larger is better


def random_routing_curve(experts: Sequence[Point]) -> list[Point]:
    """Vertices, by increasing GFLOPs, of the best random mixture of ``experts`` ((gflops, quality) each,
    quality larger-is-better): the non-dominated experts' upper concave hull."""
    ordered = sorted(set(experts), key=lambda point: (point[0], -point[1]))
    useful: list[Point] = []
    for point in ordered:
        if not useful or point[1] > useful[-1][1]:
            useful.append(point)
    hull: list[Point] = []
    for point in useful:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) >= 0:
            hull.pop()
        hull.append(point)
    return hull


def _cross(origin: Point, a: Point, b: Point) -> float:
    """> 0 when ``a`` lies below the segment from ``origin`` to ``b`` (so ``a`` is not on the upper hull)."""
    return (a[0] - origin[0]) * (b[1] - origin[1]) - (a[1] - origin[1]) * (b[0] - origin[0])


def curve_quality(curve: Sequence[Point], gflops: float) -> float | None:
    """Quality of the best random router spending at most ``gflops``; None below the cheapest expert."""
    if not curve or gflops < curve[0][0]:
        return None
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if gflops <= x1:
            return y0 + (y1 - y0) * (gflops - x0) / (x1 - x0)
    return curve[-1][1]


def dominated_area(
    points: Sequence[Point], curve: Sequence[Point], reference: Point, ideal_gflops: float = 0.0
) -> float:
    """Area of the part of the box [ideal_gflops, reference gflops] x [reference quality, inf) dominated by
    ``points`` together with everything on ``curve``: the integral over the budget of the best quality
    reachable within it, above the reference quality. Exact (the integrand is piecewise linear)."""
    gflops_bound, quality_floor = reference
    breaks = {ideal_gflops, gflops_bound}
    breaks.update(x for x, _ in [*points, *curve] if ideal_gflops < x < gflops_bound)
    ordered = sorted(breaks)
    area = 0.0
    for start, end in zip(ordered, ordered[1:], strict=False):
        step = max((y for x, y in points if x <= start), default=quality_floor)
        floor = max(step, quality_floor)
        low, high = curve_quality(curve, start), curve_quality(curve, end)
        if low is None or high is None:
            area += (floor - quality_floor) * (end - start)
        else:
            area += _integral_of_max(start, end, low, high, floor) - quality_floor * (end - start)
    return area


def _integral_of_max(start: float, end: float, low: float, high: float, floor: float) -> float:
    """Integral over [start, end] of max(the line from ``low`` to ``high``, ``floor``)."""
    width = end - start
    if low >= floor and high >= floor:
        return (low + high) / 2 * width
    if low <= floor and high <= floor:
        return floor * width
    crossing = start + (floor - low) / (high - low) * width
    if high > floor:  # the line rises above the floor at the crossing
        return floor * (crossing - start) + (floor + high) / 2 * (end - crossing)
    return (low + floor) / 2 * (crossing - start) + floor * (end - crossing)


def share_beyond_random(
    points: Sequence[Point], experts: Sequence[Point], reference: Point, ideal: Point
) -> float | None:
    """How much of what random routing leaves uncovered between the reference point and the ideal the
    ``points`` cover: 0 = no better than random routing at any budget, 1 = the ideal. None when random
    routing already covers the whole box."""
    curve = random_routing_curve(experts)
    box = (reference[0] - ideal[0]) * (ideal[1] - reference[1])
    baseline = dominated_area([], curve, reference, ideal[0])
    left = box - baseline
    if left <= 1e-12 * max(box, 1e-300):
        return None
    return (dominated_area(points, curve, reference, ideal[0]) - baseline) / left
