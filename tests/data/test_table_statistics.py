"""The train statistics a table import standardises with (``dynmm.data.table.Moments``): accurate, and the same
to the bit however the table was batched."""

from __future__ import annotations

import numpy as np

from dynmm.data.table import MOMENT_BLOCK_ROWS, Moments


def moments_of(values: np.ndarray, batch_sizes) -> Moments:
    moments, start = Moments(), 0
    for size in batch_sizes:
        moments.add(values[start : start + size])
        start += size
    assert start == len(values)
    return moments


def test_the_statistics_match_numpy_on_data_far_from_zero():
    rng = np.random.default_rng(0)
    values = rng.normal([1e5, -3.0, 0.0], [0.01, 2.0, 1e-3], size=(3 * MOMENT_BLOCK_ROWS + 17, 3)).astype(np.float32)
    transform = moments_of(values, [len(values)]).transform((3,))
    exact = values.astype(np.float64)
    np.testing.assert_allclose(transform.mean, exact.mean(0), rtol=1e-9, atol=1e-9)  # float32 data: ~1e-7 each
    np.testing.assert_allclose(transform.std, exact.std(0), rtol=1e-6)


def test_the_statistics_do_not_depend_on_the_batches():
    rng = np.random.default_rng(1)
    sequences = rng.normal(5.0, 3.0, size=(20_011, 4, 3)).astype(np.float32)  # features: the last axis
    whole = moments_of(sequences, [len(sequences)]).transform((4, 3))
    sizes = rng.integers(1, 3000, 30)
    sizes = [*sizes[np.cumsum(sizes) < len(sequences)]]
    batched = moments_of(sequences, [*sizes, len(sequences) - sum(sizes)]).transform((4, 3))
    assert batched == whole
    per_channel = moments_of(sequences.reshape(-1, 3, 2, 2)[:5000], [1234, 3766]).transform((3, 2, 2))
    assert np.shape(per_channel.mean) == (3, 1, 1)
