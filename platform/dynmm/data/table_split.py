"""Which split each row of a user's table goes to, decided as the table streams by: deterministic for a seed,
independent of how the rows are batched, holding one block of decisions per class in memory.

The method (stratified for classification; regression and multilabel are one stream):

1. split sizes: the rows with a label, times the fractions, rounded by largest remainder, so they add up;
2. per-class counts: each split's size spread over the classes in proportion to their sizes, floors first and
   the rows left over to the largest remainders, equal remainders in seeded random order (train first, then
   valid from what train left, test the rest; as scikit-learn's stratified ``train_test_split`` does);
3. per class, its rows in file order are dealt a seeded random permutation of its counts, drawn a block at a
   time (a multivariate hypergeometric draw of the block's counts, then a permutation of the block), which is
   a uniformly random arrangement of the class's rows over the splits with exactly those counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dynmm.data.format import SPLITS
from dynmm.errors import DatasetError

BLOCK_ROWS = 4096
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def parse_fractions(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> (0.7, 0.15, 0.15): three positive fractions of train, valid, test adding to 1."""
    try:
        parts = text.split(",") if isinstance(text, str) else list(text)
        fractions = tuple(float(part) for part in parts)
    except (TypeError, ValueError):
        fractions = ()
    if len(fractions) != 3 or not all(0 < value < 1 for value in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DatasetError(f"--split: expected three fractions of train, valid and test, each above 0, adding "
                           f"to 1 (e.g. 0.7,0.15,0.15), got {text!r}")
    return fractions  # type: ignore[return-value]


def largest_remainder(total: int, weights: Sequence[float]) -> np.ndarray:
    """``total`` spread in proportion to ``weights`` as integers adding up to ``total``."""
    exact = total * np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts = np.floor(exact).astype(np.int64)
    leftover = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:leftover]] += 1
    return counts


def _approximate_mode(class_counts: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``draws`` rows spread over classes in proportion to ``class_counts``, each at most its class's count:
    floors, then one more row each for the largest remainders, ties in random order."""
    if class_counts.sum() == 0:
        return np.zeros_like(class_counts)
    exact = class_counts * draws / class_counts.sum()
    counts = np.floor(exact).astype(np.int64)
    remainders = exact - counts
    room = counts < class_counts
    order = np.lexsort((rng.permutation(len(counts)), -remainders))  # remainder first, random among ties
    for index in order[room[order]][: draws - int(counts.sum())]:
        counts[index] += 1
    return counts


def split_counts(class_counts: Sequence[int], fractions: Sequence[float], seed: int) -> np.ndarray:
    """(classes, 3) rows per class and split: each split's size exact, each class spread as evenly as it can."""
    class_counts = np.asarray(class_counts, dtype=np.int64)
    sizes = largest_remainder(int(class_counts.sum()), fractions)
    rng = np.random.default_rng([seed, 1])
    train = _approximate_mode(class_counts, int(sizes[0]), rng)
    valid = _approximate_mode(class_counts - train, int(sizes[1]), rng)
    return np.stack([train, valid, class_counts - train - valid], axis=1)


class _ClassStream:
    """The split codes (0 train, 1 valid, 2 test) of one class's rows, in file order."""

    def __init__(self, counts: np.ndarray, rng: np.random.Generator):
        self.remaining = counts.copy()
        self.rng = rng
        self.codes = np.zeros(0, dtype=np.int8)

    def take(self, rows: int) -> np.ndarray:
        while len(self.codes) < rows:
            block_rows = int(min(BLOCK_ROWS, self.remaining.sum()))
            if block_rows == 0:
                raise RuntimeError("more rows of a class than counted in the first pass: the file changed")
            block = self.rng.multivariate_hypergeometric(self.remaining, block_rows)
            self.remaining -= block
            dealt = self.rng.permutation(np.repeat(np.arange(len(SPLITS), dtype=np.int8), block))
            self.codes = np.concatenate([self.codes, dealt])
        taken, self.codes = self.codes[:rows], self.codes[rows:]
        return taken


class SplitDealer:
    """Deals each row a split from its class, as the rows stream by (see the module docstring). A new dealer
    with the same counts and seed deals the same codes again, which is how later passes find each row's split."""

    def __init__(self, class_counts: Sequence[int], fractions: Sequence[float], seed: int):
        self.counts = split_counts(class_counts, fractions, seed)
        self.streams = [
            _ClassStream(counts, np.random.default_rng([seed, 2, index])) for index, counts in enumerate(self.counts)
        ]

    def deal(self, classes: np.ndarray) -> np.ndarray:
        """Split codes (int8: 0 train, 1 valid, 2 test) for a batch of rows' class indices; -1 (no label)
        gets -1."""
        codes = np.full(len(classes), -1, dtype=np.int8)
        order = np.argsort(classes, kind="stable")
        sorted_classes = classes[order]
        starts = np.flatnonzero(np.r_[True, sorted_classes[1:] != sorted_classes[:-1]]) if len(classes) else []
        for start, stop in zip(starts, [*starts[1:], len(classes)], strict=True):
            label = int(sorted_classes[start])
            if label >= 0:
                codes[order[start:stop]] = self.streams[label].take(stop - start)
        return codes
