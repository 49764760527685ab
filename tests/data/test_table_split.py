"""Which split each row of a user's table goes to (``dynmm.data.table_split``): exact sizes, stratified by
class, deterministic for a seed, the same however the rows are batched."""

from __future__ import annotations

import numpy as np
import pytest

from dynmm.data.table_split import SplitDealer, largest_remainder, parse_fractions, split_counts
from dynmm.errors import DatasetError

FRACTIONS = (0.7, 0.15, 0.15)


def dealt(classes: np.ndarray, batch_sizes, seed: int = 0) -> np.ndarray:
    dealer = SplitDealer(np.bincount(classes[classes >= 0]), FRACTIONS, seed)
    bounds = np.cumsum([0, *batch_sizes])
    pieces = zip(bounds[:-1], bounds[1:], strict=True)
    return np.concatenate([dealer.deal(classes[start:stop]) for start, stop in pieces])


def test_the_codes_do_not_depend_on_how_the_rows_are_batched():
    rng = np.random.default_rng(0)
    classes = rng.choice([0, 1, 2, -1], size=20_000, p=[0.6, 0.3, 0.05, 0.05])
    whole = dealt(classes, [len(classes)])
    pieces = rng.integers(1, 3000, 40)
    pieces = [*pieces[np.cumsum(pieces) < len(classes)]]
    pieces.append(len(classes) - sum(pieces))
    np.testing.assert_array_equal(dealt(classes, pieces), whole)
    assert (whole[classes < 0] == -1).all() and (whole[classes >= 0] >= 0).all()


def test_each_class_is_spread_exactly_over_the_splits():
    rng = np.random.default_rng(1)
    classes = rng.choice(3, size=10_001, p=[0.7, 0.2, 0.1])
    codes = dealt(classes, [4096, 4096, 1809])
    counts = split_counts(np.bincount(classes), FRACTIONS, 0)
    for label in range(3):
        np.testing.assert_array_equal(np.bincount(codes[classes == label], minlength=3), counts[label])
        share = counts[label] / counts[label].sum()
        np.testing.assert_allclose(share, FRACTIONS, atol=1 / counts[label].sum() + 1e-9)
    np.testing.assert_array_equal(np.bincount(codes), largest_remainder(len(classes), FRACTIONS))


def test_the_seed_sets_the_arrangement():
    classes = np.repeat([0, 1], 500)
    assert (dealt(classes, [1000], seed=0) == dealt(classes, [1000], seed=0)).all()
    assert (dealt(classes, [1000], seed=0) != dealt(classes, [1000], seed=1)).any()


def test_many_small_classes_still_fill_every_split_in_proportion():
    classes = np.repeat(np.arange(1000), 3)  # rounding each class alone would leave test empty
    sizes = np.bincount(dealt(classes, [len(classes)]))
    np.testing.assert_array_equal(sizes, [2100, 450, 450])


@pytest.mark.parametrize("text", ["0.5,0.5", "0.8,0.1,0.2", "a,b,c", "0,0.5,0.5", "", "0.7,0.15,0.15,0"])
def test_bad_fractions_are_refused(text):
    with pytest.raises(DatasetError, match="--split: expected three fractions"):
        parse_fractions(text)
    assert parse_fractions("0.8, 0.1, 0.1") == (0.8, 0.1, 0.1)
