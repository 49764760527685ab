"""Pareto math against hand-computed sets (quality maximised, GFLOPs minimised)."""

import itertools
import math
import random

import pytest

from dynmm.tune.pareto import (
    crowding_distance,
    dominates,
    hypervolume,
    hypervolume_contributions,
    knee_point,
    non_dominated_sort,
    pareto_front,
    selection_order,
)

QUALITY_VS_COST = ("max", "min")


def test_dominance_needs_one_strict_improvement():
    assert dominates((0.9, 1.0), (0.8, 1.0), QUALITY_VS_COST)
    assert not dominates((0.9, 1.0), (0.9, 1.0), QUALITY_VS_COST)
    assert not dominates((0.9, 2.0), (0.8, 1.0), QUALITY_VS_COST)


def test_non_dominated_sort_layers_a_hand_made_set():
    points = [(0.90, 10.0), (0.80, 2.0), (0.85, 5.0), (0.80, 6.0), (0.70, 7.0), (0.95, 12.0)]
    # (0.80, 6) is dominated by (0.85, 5); (0.70, 7) by (0.80, 6) as well.
    assert non_dominated_sort(points, QUALITY_VS_COST) == [[0, 1, 2, 5], [3], [4]]


def test_ties_and_duplicates_share_the_front():
    points = [(0.9, 1.0), (0.9, 1.0), (0.9, 2.0), (0.8, 1.0)]
    assert non_dominated_sort(points, QUALITY_VS_COST) == [[0, 1], [2, 3]]
    assert pareto_front(points, QUALITY_VS_COST) == [0, 1]


def test_hypervolume_of_a_staircase_in_two_dimensions():
    # reference quality 0, cost 10: rectangles 0.5*8 + (0.8-0.5)*(10-6)... computed by hand:
    # points (0.5, 2) and (0.8, 6): union area = 0.5*(10-2) + (0.8-0.5)*(10-6) = 4.0 + 1.2
    points = [(0.5, 2.0), (0.8, 6.0)]
    assert hypervolume(points, (0.0, 10.0), QUALITY_VS_COST) == pytest.approx(5.2)


def test_hypervolume_ignores_duplicates_dominated_points_and_points_beyond_the_reference():
    base = [(0.5, 2.0), (0.8, 6.0)]
    noisy = base + [(0.5, 2.0), (0.4, 3.0), (0.9, 11.0)]
    assert hypervolume(noisy, (0.0, 10.0), QUALITY_VS_COST) == pytest.approx(5.2)


def test_hypervolume_in_three_dimensions_is_the_union_of_boxes():
    # two boxes (minimisation) against reference (4,4,4): [1,4]x[2,4]x[2,4]=3*2*2=12, [2,4]x[1,4]x[1,4]=2*3*3=18,
    # overlap [2,4]x[2,4]x[2,4]=8 -> 22
    points = [(1.0, 2.0, 2.0), (2.0, 1.0, 1.0)]
    assert hypervolume(points, (4.0, 4.0, 4.0), ("min", "min", "min")) == pytest.approx(22.0)


def test_empty_front_has_no_volume_and_no_knee():
    assert hypervolume([], (0.0, 1.0), QUALITY_VS_COST) == 0.0
    assert knee_point([], QUALITY_VS_COST) is None


def test_knee_is_the_balanced_front_member():
    points = [(0.60, 1.0), (0.94, 3.0), (0.96, 10.0), (0.50, 9.0)]
    assert knee_point(points, QUALITY_VS_COST) == 1


def test_crowding_gives_extremes_infinity_and_inner_points_their_neighbour_span():
    points = [(0.5, 1.0), (0.7, 3.0), (0.9, 9.0)]
    distance = crowding_distance(points, QUALITY_VS_COST)
    assert math.isinf(distance[0]) and math.isinf(distance[2])
    assert distance[1] == pytest.approx((0.9 - 0.5) / 0.4 + (9.0 - 1.0) / 8.0)


def test_selection_order_ranks_by_front_then_spread():
    points = [(0.5, 1.0), (0.7, 3.0), (0.9, 9.0), (0.6, 5.0)]
    assert selection_order(points, QUALITY_VS_COST)[:3] == [0, 2, 1]
    assert selection_order(points, QUALITY_VS_COST)[-1] == 3


def test_hypervolume_contribution_is_the_volume_lost_without_the_point():
    # reference (0.4, 10): (0.5, 2) alone covers 0.1*8 = 0.8, (0.8, 6) alone 0.4*4 = 1.6, together
    # 0.8 + (0.8-0.5)*(10-6) = 2.0; so each adds 2.0 minus the other's volume
    points = [(0.5, 2.0), (0.8, 6.0), (0.8, 6.0), (0.3, 1.0), (0.6, 7.0)]
    contributions = hypervolume_contributions(points, (0.4, 10.0), QUALITY_VS_COST)
    assert contributions[0] == pytest.approx(2.0 - 1.6)
    # a duplicate, a point beyond the reference and a dominated point add exactly nothing (they tie)
    assert contributions[1:] == [0.0, 0.0, 0.0, 0.0]


def test_with_a_reference_a_front_is_ranked_by_hypervolume_contribution():
    # front (0.5, 1), (0.7, 3), (0.9, 9) against reference (0.55, 10): the cheap extreme is less accurate than
    # the reference and adds nothing; (0.7, 3) covers 0.15*7 = 1.05, (0.9, 9) 0.35*1, overlapping 0.15*1
    front = [(0.5, 1.0), (0.7, 3.0), (0.9, 9.0)]
    assert hypervolume_contributions(front, (0.55, 10.0), QUALITY_VS_COST) == pytest.approx(
        [0.0, 1.05 - 0.15, 0.35 - 0.15])
    points = [*front, (0.6, 5.0)]
    assert selection_order(points, QUALITY_VS_COST)[:3] == [0, 2, 1]  # crowding: the extremes first
    assert selection_order(points, QUALITY_VS_COST, reference=(0.55, 10.0)) == [1, 2, 0, 3]


def _brute_force_hypervolume(points, reference):
    """Minimisation: cut the box at every coordinate and add each cell whose low corner some point dominates."""
    axes = [sorted({p[k] for p in points if p[k] < reference[k]} | {reference[k]}) for k in range(len(reference))]
    volume = 0.0
    for cell in itertools.product(*(range(len(axis) - 1) for axis in axes)):
        low = [axes[k][i] for k, i in enumerate(cell)]
        if any(all(x <= c for x, c in zip(p, low, strict=True)) for p in points):
            volume += math.prod(axes[k][i + 1] - axes[k][i] for k, i in enumerate(cell))
    return volume


def test_hypervolume_and_contributions_of_a_random_three_objective_set_match_brute_force():
    rng = random.Random(7)
    directions = ("max", "min", "min")
    points = [(rng.uniform(0, 1), rng.uniform(0, 10), rng.uniform(0, 5)) for _ in range(9)]
    points += [points[0], (0.05, 9.5, 4.8)]  # a duplicate and a point dominated by almost everything
    reference = (0.1, 9.0, 4.5)
    minimised = [(-q, c, t) for q, c, t in points]
    bound = (-reference[0], reference[1], reference[2])
    total = _brute_force_hypervolume(minimised, bound)
    assert total > 0
    assert hypervolume(points, reference, directions) == pytest.approx(total, rel=1e-9)
    lost = [total - _brute_force_hypervolume(minimised[:i] + minimised[i + 1:], bound) for i in range(len(points))]
    assert hypervolume_contributions(points, reference, directions) == pytest.approx(lost, rel=1e-9, abs=1e-9)


def test_fronts_of_a_random_three_objective_set_match_pairwise_dominance():
    rng = random.Random(11)
    directions = ("max", "min", "max")
    points = [tuple(float(rng.randint(0, 3)) for _ in range(3)) for _ in range(12)]
    fronts = non_dominated_sort(points, directions)
    remaining = set(range(len(points)))
    for front in fronts:
        expected = sorted(i for i in remaining
                          if not any(dominates(points[j], points[i], directions) for j in remaining))
        assert front == expected
        remaining -= set(front)
    assert not remaining
    assert pareto_front(points, directions) == fronts[0]


def test_one_objective_keeps_the_best_value_and_its_ties():
    points = [(0.4,), (0.9,), (0.9,), (0.1,)]
    assert non_dominated_sort(points, ("max",)) == [[1, 2], [0], [3]]
    assert non_dominated_sort(points, ("min",)) == [[3], [0], [1, 2]]
    assert hypervolume(points, (0.0,), ("max",)) == pytest.approx(0.9)
    assert hypervolume_contributions([(0.4,), (0.9,), (0.1,)], (0.0,), ("max",)) == pytest.approx([0.0, 0.5, 0.0])
