"""The built-in ``synthetic-mosei`` dataset: CMU-MOSEI-shaped sequences (vision (50, 35), audio (50, 74),
text (50, 300), sentiment label in [-3, 3]) where a chosen fraction of samples is answerable from text
alone and the rest needs audio and vision, so a DynMM gate has something real to learn.

How a sample is made (sequences are front-zero-padded to 50 steps, 10 to 50 of them real):

- every real step of every modality is standard normal noise;
- a *text-only* sample adds ``SIGNAL * label / 3`` times a fixed unit direction to each text step; its
  audio and vision are noise only;
- any other sample has ``label = a + v`` with ``a`` and ``v`` uniform in [-1.5, 1.5], encoded along fixed
  directions in audio (``SIGNAL * a / 1.5``) and vision (``SIGNAL * v / 1.5``); its text carries a random,
  unrelated sentiment the same way a text-only sample does (misleading).

Data are generated and written chunk by chunk, so memory does not grow with ``num_samples``. Each random
stream is drawn sequentially, so the data depend on ``seed`` only, not on ``chunk_rows``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dynmm.data.format import SPLITS, DatasetMeta, ModalitySpec
from dynmm.data.writer import dataset_writer
from dynmm.errors import DatasetError

SEQUENCE_STEPS = 50
MIN_REAL_STEPS = 10
FEATURES = {"vision": 35, "audio": 74, "text": 300}
LABEL_LIMIT = 3.0
SIGNAL = 3.0  # per-step signal along a modality's direction, against unit noise
BUILTIN_NUM_SAMPLES = 8_000


class _Streams:
    """Independent seeded random streams, one per kind of draw."""

    def __init__(self, seed: int):
        directions, latents, *noise = (
            np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(5)
        )
        self.directions = {
            name: _unit(directions.standard_normal(size)).astype(np.float32)
            for name, size in FEATURES.items()
        }
        self.latents = latents
        self.noise = dict(zip(FEATURES, noise, strict=True))


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _chunk(
    streams: _Streams, num_rows: int, text_only_fraction: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    uniforms = streams.latents.random((num_rows, 5))
    text_only = uniforms[:, 0] < text_only_fraction
    real_steps = MIN_REAL_STEPS + (uniforms[:, 1] * (SEQUENCE_STEPS - MIN_REAL_STEPS + 1)).astype(np.int64)
    text_sentiment = LABEL_LIMIT * (2 * uniforms[:, 2] - 1)
    audio_part, vision_part = 1.5 * (2 * uniforms[:, 3] - 1), 1.5 * (2 * uniforms[:, 4] - 1)
    labels = np.where(text_only, text_sentiment, audio_part + vision_part)
    amplitudes = {
        "text": text_sentiment / LABEL_LIMIT,
        "audio": np.where(text_only, 0.0, audio_part / 1.5),
        "vision": np.where(text_only, 0.0, vision_part / 1.5),
    }
    padding = np.arange(SEQUENCE_STEPS)[None, :] < (SEQUENCE_STEPS - real_steps)[:, None]
    features = {}
    for name, size in FEATURES.items():
        values = streams.noise[name].standard_normal((num_rows, SEQUENCE_STEPS, size), dtype=np.float32)
        signal = SIGNAL * amplitudes[name][:, None] * streams.directions[name]
        values += signal.astype(np.float32)[:, None, :]
        values[padding] = 0.0
        features[name] = values
    return features, np.clip(labels, -LABEL_LIMIT, LABEL_LIMIT).astype(np.float32)


def split_sizes(num_samples: int, fractions: Sequence[float]) -> dict[str, int]:
    if len(fractions) != len(SPLITS) or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DatasetError(
            f"splits must be three positive fractions (train, valid, test) summing to 1, got {fractions}"
        )
    train, valid = round(fractions[0] * num_samples), round(fractions[1] * num_samples)
    sizes = {"train": train, "valid": valid, "test": num_samples - train - valid}
    if min(sizes.values()) < 1:
        raise DatasetError(
            f"num_samples {num_samples} leaves a split empty with fractions {fractions}: {sizes}"
        )
    return sizes


TEXT_ONLY_FRACTION = 0.8
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)


def synthetic_mosei_meta(
    num_samples: int = BUILTIN_NUM_SAMPLES,
    text_only_fraction: float = TEXT_ONLY_FRACTION,
    seed: int = 0,
    splits: Sequence[float] = SPLIT_FRACTIONS,
) -> DatasetMeta:
    """The metadata ``generate_synthetic_mosei`` writes with these arguments (the built-in one by default)."""
    return DatasetMeta(
        name="synthetic-mosei",
        task="regression",
        num_classes=None,
        modalities={name: ModalitySpec(shape=(SEQUENCE_STEPS, size)) for name, size in FEATURES.items()},
        label_range=(-LABEL_LIMIT, LABEL_LIMIT),
        source="dynmm.data.synthetic.generate_synthetic_mosei",
        synthetic=True,
        params={
            "num_samples": num_samples,
            "text_only_fraction": text_only_fraction,
            "seed": seed,
            "split_fractions": list(splits),
        },
    )


def generate_synthetic_mosei(
    out_dir: str | Path,
    num_samples: int = BUILTIN_NUM_SAMPLES,
    text_only_fraction: float = TEXT_ONLY_FRACTION,
    seed: int = 0,
    chunk_rows: int = 2048,
    splits: Sequence[float] = SPLIT_FRACTIONS,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``num_samples`` synthetic MOSEI-shaped samples to ``out_dir`` (rows split contiguously
    train | valid | test by ``splits``); sample ids ``synthetic-mosei-NNNNNN``."""
    if not 0 <= text_only_fraction <= 1:
        raise DatasetError(f"text_only_fraction must be in [0, 1], got {text_only_fraction}")
    if chunk_rows < 1:
        raise DatasetError(f"chunk_rows must be >= 1, got {chunk_rows}")
    sizes = split_sizes(num_samples, splits)
    streams = _Streams(seed)
    meta = synthetic_mosei_meta(num_samples, text_only_fraction, seed, splits)
    first_row = 0
    with dataset_writer(out_dir, meta, overwrite=overwrite) as writer:
        for split, size in sizes.items():
            for start in range(first_row, first_row + size, chunk_rows):
                num_rows = min(chunk_rows, first_row + size - start)
                features, labels = _chunk(streams, num_rows, text_only_fraction)
                sample_ids = [f"synthetic-mosei-{row:06d}" for row in range(start, start + num_rows)]
                writer.write(split, {**features, "label": labels, "sample_id": sample_ids})
            first_row += size
    return Path(out_dir)


def write_depth_labelled_nyuv2(folder: str | Path, ids: dict[str, list[str]], size: tuple[int, int] = (48, 64)) -> Path:
    """A stand-in for NYU Depth V2 in its ESANet layout (``{part}.txt`` and ``{part}/{rgb,depth,labels_40}/
    {id}.png``, for ``convert_nyuv2``), which cannot be downloaded here: random RGB, random depth in
    millimetres and labels that follow the depth (near: class 1, far: class 2, else void), so the depth stream
    carries the task. For tests and benches; ``ids`` maps each part (train, test) to its sample ids."""
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(0)
    for part, part_ids in ids.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{part}.txt").write_text("\n".join(part_ids))
        for sample_id in part_ids:
            depth = rng.integers(500, 8000, size, dtype=np.uint16)
            label = np.where(depth < 3000, 1, np.where(depth > 5000, 2, 0)).astype(np.uint8)
            images = {"rgb": rng.integers(0, 256, (*size, 3), dtype=np.uint8), "depth": depth, "labels_40": label}
            for name, array in images.items():
                (folder / part / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(folder / part / name / f"{sample_id}.png")
    return folder
