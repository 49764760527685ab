"""Converters from the layouts users bring (see docs/DYNMM.md, "Data formats users bring") to the dataset
format, all through the atomic ``dataset_writer``: a bad file raises DatasetError naming the file, split,
key and row, and leaves nothing behind.

- ``convert_mosei``: MultiBench/MulT aligned pickle ``mosei_senti_data.pkl``;
- ``convert_mmimdb``: MultiBench HDF5 ``multimodal_imdb.hdf5`` (needs the optional h5py);
- ``convert_avmnist``: MultiBench AV-MNIST ``.npy`` folder;
- ``convert_nyuv2``: NYU Depth V2 in the ESANet PNG layout (``dynmm.data.nyuv2``);
- ``prepare_dataset``: one entry point by kind, also for the built-in datasets.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dynmm.data.format import SPLITS, DatasetMeta, InputTransform, ModalitySpec
from dynmm.data.nyuv2 import convert_nyuv2
from dynmm.data.readers import BUILTIN_DATASETS
from dynmm.data.safe_pickle import load_data_pickle
from dynmm.data.writer import NonFinitePolicy, dataset_writer, describe_location, expect_numeric, expect_shape
from dynmm.errors import DatasetError

CHUNK_ROWS = 2048

MOSEI_SHAPES = {"vision": (50, 35), "audio": (50, 74), "text": (50, 300)}
MOSEI_LABEL_LIMIT = 3.0
MMIMDB_BOUNDARIES = (15552, 18160)
MMIMDB_GENRES = 23
AVMNIST_VALID_SIZE = 5000


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")


def _require_keys(mapping: Any, keys: list[str], *, where: str) -> None:
    if not isinstance(mapping, Mapping):
        raise DatasetError(f"{where}: expected a dict with keys {keys}, got {type(mapping).__name__}")
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise DatasetError(f"{where}: missing key(s) {missing}; expected keys {keys}")


def _rows_of(arrays: Mapping[str, Any], *, where: str) -> int:
    """The common row count N of arrays (numpy or h5py) that must all have N rows."""
    scalars = [key for key, array in arrays.items() if len(array.shape) == 0]
    if scalars:
        raise DatasetError(
            f"{where}: key '{scalars[0]}': expected an array with one row per sample, got a scalar"
        )
    counts = {key: array.shape[0] for key, array in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DatasetError(f"{where}: expected the same number of rows N in every key, got {counts}")
    return next(iter(counts.values()))


def _as_array(value: Any, *, where: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except ValueError as error:  # ragged nested lists
        raise DatasetError(f"{where}: expected an array with one row per sample ({error})") from None


# ---------------------------------------------------------------- CMU-MOSEI


def mosei_meta(source: Path) -> DatasetMeta:
    return DatasetMeta(
        name="mosei",
        task="regression",
        num_classes=None,
        modalities={name: ModalitySpec(shape=shape) for name, shape in MOSEI_SHAPES.items()},
        input_transforms={"audio": InputTransform(neginf_as=0.0)},  # the pickle's -inf audio (missing) is 0
        label_range=(-MOSEI_LABEL_LIMIT, MOSEI_LABEL_LIMIT),
        source=str(source),
    )


def _mosei_sample_ids(ids: np.ndarray) -> list[str]:
    """One string per row: the row's id parts (video id, segment bounds, ...) joined by ``_``."""

    def text(part: Any) -> str:
        return part.decode("utf-8", errors="replace") if isinstance(part, bytes) else str(part)

    return [
        "_".join(text(part) for part in row) for row in np.asarray(ids, dtype=object).reshape(len(ids), -1)
    ]


def _mosei_split(data: Mapping[str, Any], *, file: str, split: str) -> dict[str, np.ndarray]:
    """Validated arrays of one split: features float32, labels (N,), -inf in audio set to 0."""
    arrays = {
        key: _as_array(data[key], where=describe_location(file, split, key))
        for key in (*MOSEI_SHAPES, "labels", "id")
    }
    _rows_of(arrays, where=f"{file}: split '{split}'")
    for key, shape in MOSEI_SHAPES.items():
        where = describe_location(file, split, key)
        expect_numeric(arrays[key].dtype, where=where)
        expect_shape(arrays[key].shape, shape, where=where)
    labels = arrays["labels"]
    where = describe_location(file, split, "labels")
    expect_numeric(labels.dtype, where=where)
    if labels.size != len(labels):
        raise DatasetError(f"{where}: expected shape (N, 1, 1), got {tuple(labels.shape)}")
    arrays["labels"] = labels.reshape(len(labels))
    audio = arrays["audio"].astype(np.float32)
    # The MultiBench pickle encodes missing audio as -inf (docs/DYNMM.md): that is 0, not an error.
    audio[np.isneginf(audio)] = 0.0
    arrays["audio"] = audio
    return arrays


def convert_mosei(
    src_pkl: str | Path,
    out_dir: str | Path,
    *,
    nonfinite: NonFinitePolicy = "fail",
    overwrite: bool = False,
) -> Path:
    """Convert the MultiBench/MulT aligned MOSEI pickle. Samples whose text is all zeros are dropped
    (counted in ``params["dropped_text_all_zero"]``); sequences stay front-zero-padded."""
    src_pkl = Path(src_pkl)
    _require_file(src_pkl)
    data = load_data_pickle(src_pkl)
    _require_keys(data, list(SPLITS), where=src_pkl.name)
    splits = {}
    for split in SPLITS:
        _require_keys(data[split], [*MOSEI_SHAPES, "labels", "id"], where=f"{src_pkl.name}: split '{split}'")
        splits[split] = _mosei_split(data[split], file=src_pkl.name, split=split)
    dropped = {split: int((~_has_text(arrays["text"])).sum()) for split, arrays in splits.items()}
    meta = mosei_meta(src_pkl).model_copy(update={"params": {"dropped_text_all_zero": dropped}})
    with dataset_writer(out_dir, meta, overwrite=overwrite, nonfinite=nonfinite) as writer:
        for split, arrays in splits.items():
            kept = np.flatnonzero(_has_text(arrays["text"]))
            sample_ids = _mosei_sample_ids(arrays["id"])
            for start in range(0, len(kept), CHUNK_ROWS):
                rows = kept[start : start + CHUNK_ROWS]
                columns = {name: arrays[name][rows] for name in MOSEI_SHAPES}
                columns["label"] = arrays["labels"][rows]
                columns["sample_id"] = [sample_ids[row] for row in rows]
                writer.write(
                    split, columns, source_keys={"label": "labels", "sample_id": "id"}, source_rows=rows
                )
    return Path(out_dir)


def _has_text(text: np.ndarray) -> np.ndarray:
    return (text.reshape(len(text), -1) != 0).any(axis=1)


# ---------------------------------------------------------------- MM-IMDB


def mmimdb_meta(source: Path, boundaries: tuple[int, int]) -> DatasetMeta:
    return DatasetMeta(
        name="mmimdb",
        task="multilabel",
        num_classes=MMIMDB_GENRES,
        modalities={"text": ModalitySpec(shape=(300,)), "image": ModalitySpec(shape=(4096,))},
        source=str(source),
        params={"boundaries": list(boundaries)},
    )


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise DatasetError("reading MM-IMDB HDF5 needs h5py: pip install 'dynmm-platform[hdf5]'") from None
    return h5py


def _split_ranges(boundaries: tuple[int, int], num_rows: int, *, file: str) -> dict[str, range]:
    first, second = (int(value) for value in boundaries)
    if not 0 < first < second < num_rows:
        raise DatasetError(
            f"{file}: boundaries must satisfy 0 < train_end < valid_end < N = {num_rows}, "
            f"got ({first}, {second})"
        )
    return {"train": range(0, first), "valid": range(first, second), "test": range(second, num_rows)}


def convert_mmimdb(
    src_hdf5: str | Path,
    out_dir: str | Path,
    *,
    boundaries: tuple[int, int] = MMIMDB_BOUNDARIES,
    nonfinite: NonFinitePolicy = "fail",
    overwrite: bool = False,
) -> Path:
    """Convert the MultiBench MM-IMDB HDF5: ``features`` -> ``text`` (300,), ``vgg_features`` -> ``image``
    (4096,), ``genres`` -> multi-hot float32 label (23,); rows train | valid | test at ``boundaries``;
    sample ids ``mmimdb-NNNNN`` (row in the file). Reads the file in chunks."""
    h5py = _import_h5py()
    src_hdf5 = Path(src_hdf5)
    _require_file(src_hdf5)
    source_keys = {"text": "features", "image": "vgg_features", "label": "genres"}
    try:
        file = h5py.File(src_hdf5, "r")
    except OSError as error:
        raise DatasetError(f"{src_hdf5.name}: not a readable HDF5 file ({error})") from None
    with file:
        _require_keys(file, list(source_keys.values()), where=src_hdf5.name)
        datasets = {column: file[key] for column, key in source_keys.items()}
        expected = {"text": (300,), "image": (4096,), "label": (MMIMDB_GENRES,)}
        for column, dataset in datasets.items():
            where = f"{src_hdf5.name}: key '{source_keys[column]}'"
            expect_numeric(dataset.dtype, where=where)
            expect_shape(dataset.shape, expected[column], where=where)
        num_rows = _rows_of(datasets, where=src_hdf5.name)
        ranges = _split_ranges(boundaries, num_rows, file=src_hdf5.name)
        meta = mmimdb_meta(src_hdf5, (ranges["train"].stop, ranges["valid"].stop))
        with dataset_writer(out_dir, meta, overwrite=overwrite, nonfinite=nonfinite) as writer:
            for split, rows in ranges.items():
                for start in range(rows.start, rows.stop, CHUNK_ROWS):
                    stop = min(start + CHUNK_ROWS, rows.stop)
                    columns = {column: dataset[start:stop] for column, dataset in datasets.items()}
                    columns["sample_id"] = [f"mmimdb-{row:05d}" for row in range(start, stop)]
                    writer.write(split, columns, source_keys=source_keys, source_rows=np.arange(start, stop))
    return Path(out_dir)


# ---------------------------------------------------------------- AV-MNIST


def avmnist_meta(source: Path, valid_size: int) -> DatasetMeta:
    return DatasetMeta(
        name="avmnist",
        task="multiclass",
        num_classes=10,
        modalities={"image": ModalitySpec(shape=(28, 28)), "audio": ModalitySpec(shape=(112, 112))},
        source=str(source),
        params={"valid_size": valid_size, "values": "as stored in the .npy files (not rescaled)"},
    )


def _load_npy(path: Path) -> np.ndarray:
    _require_file(path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path}: not a readable .npy array ({error})") from None


def _avmnist_part(src_dir: Path, part: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The (memory-mapped, validated) arrays of ``train`` or ``test``, and their file names."""
    files = {
        "image": f"image/{part}_data.npy",
        "audio": f"audio/{part}_data.npy",
        "label": f"{part}_labels.npy",
    }
    arrays = {column: _load_npy(src_dir / name) for column, name in files.items()}
    expect_shape(arrays["image"].shape, (784,), where=describe_location(files["image"], part, "image"))
    expect_shape(arrays["audio"].shape, (112, 112), where=describe_location(files["audio"], part, "audio"))
    labels = arrays["label"]
    if labels.ndim == 2 and labels.shape[1] == 1:
        arrays["label"] = labels.reshape(len(labels))
    expect_shape(arrays["label"].shape, (), where=describe_location(files["label"], part, "label"))
    _rows_of(arrays, where=f"{src_dir.name}: split '{part}'")
    return arrays, files


def convert_avmnist(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    valid_size: int = AVMNIST_VALID_SIZE,
    nonfinite: NonFinitePolicy = "fail",
    overwrite: bool = False,
) -> Path:
    """Convert the MultiBench AV-MNIST folder: ``image`` (784,) -> (28, 28), ``audio`` (112, 112), labels
    0..9; valid = the last ``valid_size`` rows of train. Values are kept as stored; sample ids
    ``avmnist-train-NNNNN`` / ``avmnist-test-NNNNN`` (row in the source file)."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise DatasetError(
            f"{src_dir}: folder not found; expected the AV-MNIST folder with image/ and audio/"
        )
    train, train_files = _avmnist_part(src_dir, "train")
    test, test_files = _avmnist_part(src_dir, "test")
    num_train = len(train["label"])
    if not 0 < valid_size < num_train:
        raise DatasetError(
            f"valid_size must be between 1 and {num_train - 1} (train has {num_train} rows), got {valid_size}"
        )
    sources = {
        "train": (train, train_files, "train", range(0, num_train - valid_size)),
        "valid": (train, train_files, "train", range(num_train - valid_size, num_train)),
        "test": (test, test_files, "test", range(0, len(test["label"]))),
    }
    meta = avmnist_meta(src_dir, valid_size)
    with dataset_writer(out_dir, meta, overwrite=overwrite, nonfinite=nonfinite) as writer:
        for split, (arrays, files, part, rows) in sources.items():
            for start in range(rows.start, rows.stop, CHUNK_ROWS):
                stop = min(start + CHUNK_ROWS, rows.stop)
                columns = {
                    "image": arrays["image"][start:stop].reshape(-1, 28, 28),
                    "audio": arrays["audio"][start:stop],
                    "label": arrays["label"][start:stop],
                    "sample_id": [f"avmnist-{part}-{row:05d}" for row in range(start, stop)],
                }
                # Messages name the split being written and the .npy file the rows come from.
                writer.write(split, columns, source_keys=files, source_rows=np.arange(start, stop))
    return Path(out_dir)


# ---------------------------------------------------------------- one entry point

CONVERTERS: dict[str, Callable[..., Path]] = {
    "mosei": convert_mosei,
    "mmimdb": convert_mmimdb,
    "avmnist": convert_avmnist,
    "nyuv2": convert_nyuv2,
}


def _builtin_preparer(kind: str) -> Callable[..., Path]:
    from dynmm.data.digits import prepare_digits
    from dynmm.data.synthetic import generate_synthetic_mosei

    return {"digits": prepare_digits, "synthetic-mosei": generate_synthetic_mosei}[kind]


def prepare_dataset(kind: str, src: str | Path | None, out: str | Path, **options: Any) -> Path:
    """Convert ``src`` (converters: mosei, mmimdb, avmnist, nyuv2) or generate a built-in dataset (digits,
    synthetic-mosei: no ``src``) into ``out``. ``options`` are the keyword arguments of that function."""
    kinds = [*CONVERTERS, *BUILTIN_DATASETS]
    if kind not in kinds:
        raise DatasetError(f"unknown dataset kind {kind!r}; expected one of {kinds}")
    if kind in CONVERTERS:
        if src is None:
            raise DatasetError(f"preparing {kind!r} needs the source path (--src)")
        function, arguments = CONVERTERS[kind], (src, out)
    else:
        if src is not None:
            raise DatasetError(f"{kind!r} is built in and takes no source path (--src)")
        function, arguments = _builtin_preparer(kind), (out,)
    accepted = list(inspect.signature(function).parameters)[len(arguments) :]
    unknown = [name for name in options if name not in accepted]
    if unknown:
        raise DatasetError(f"option(s) {unknown} do not apply to {kind!r}; it accepts {accepted}")
    return function(*arguments, **options)
