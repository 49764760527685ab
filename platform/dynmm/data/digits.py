"""The built-in ``digits`` dataset: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no
download) cut into two views, the top half and the bottom half of each image, as a small real
two-modality classification task for smoke tests and demos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dynmm.data.format import DatasetMeta, InputTransform, ModalitySpec
from dynmm.data.writer import dataset_writer

SPLIT_FRACTIONS = {"train": 0.6, "valid": 0.2, "test": 0.2}
# scikit-learn's pixels count 0..16 inked cells; the dataset stores pixel / 16, and a served model takes raw pixels.
PIXEL_MAX = 16
PIXELS = InputTransform(scale=1 / PIXEL_MAX, source_range=(0, PIXEL_MAX))


def digits_meta(seed: int) -> DatasetMeta:
    view = ModalitySpec(shape=(4, 8))
    return DatasetMeta(
        name="digits",
        task="multiclass",
        num_classes=10,
        modalities={"top": view, "bottom": view},
        input_transforms={"top": PIXELS, "bottom": PIXELS},
        source="sklearn.datasets.load_digits",
        params={"seed": seed, "split_fractions": SPLIT_FRACTIONS, "scale": "pixel / 16"},
    )


def split_indices(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Stratified 60/20/20 train/valid/test row indices, each sorted."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    rest, test = train_test_split(rows, test_size=SPLIT_FRACTIONS["test"], stratify=labels, random_state=seed)
    valid_of_rest = SPLIT_FRACTIONS["valid"] / (1 - SPLIT_FRACTIONS["test"])
    train, valid = train_test_split(rest, test_size=valid_of_rest, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "valid": np.sort(valid), "test": np.sort(test)}


def prepare_digits(out_dir: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the digits dataset to ``out_dir``: modalities ``top`` (image rows 0-3) and ``bottom`` (rows
    4-7), each (4, 8) float32 in [0, 1]; label int64 0..9; sample_id ``digits-NNNN`` (original index)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * PIXELS.scale).astype(np.float32)
    labels = digits.target.astype(np.int64)
    with dataset_writer(out_dir, digits_meta(seed), overwrite=overwrite) as writer:
        for split, rows in split_indices(labels, seed).items():
            writer.write(
                split,
                {
                    "top": images[rows, :4, :],
                    "bottom": images[rows, 4:, :],
                    "label": labels[rows],
                    "sample_id": [f"digits-{row:04d}" for row in rows],
                },
                source_rows=rows,
            )
    return Path(out_dir)
