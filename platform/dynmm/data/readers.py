"""Readers of a dataset folder: a plain in-process reader (pyarrow only) and the Ray Data dataset that Ray
Train workers shard. Both read the same files in the same order and give the same keys, dtypes and
(B, *shape) tensors. Also resolves a dataset argument (built-in name or folder) to a folder.

Ray is imported only when a Ray dataset is built, so the plain reader never starts Ray.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dynmm.data.format import LABEL, META_FILE, SAMPLE_ID, DatasetMeta, read_meta, split_files
from dynmm.errors import DatasetError

if TYPE_CHECKING:
    import ray.data

Batch = dict[str, Any]
RAY_BLOCK_BYTES = 32 * 2**20


def _columns_to_read(meta: DatasetMeta, columns: Sequence[str] | None, default: list[str]) -> list[str]:
    if columns is None:
        return default
    known = [*meta.tensor_columns, SAMPLE_ID]
    unknown = [column for column in columns if column not in known]
    if unknown:
        raise DatasetError(f"dataset {meta.name!r}: unknown column(s) {unknown}; expected some of {known}")
    return list(columns)


def arrow_to_torch(column: pa.Array | pa.ChunkedArray) -> torch.Tensor | list[str]:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_string(column.type):
        return column.to_pylist()
    if isinstance(column.type, pa.FixedShapeTensorType):
        array = column.to_numpy_ndarray()
    else:
        array = column.to_numpy(zero_copy_only=False)
    with warnings.catch_warnings():
        # numpy marks Arrow-backed arrays read-only; the buffer was decoded for this call and no other
        # reader sees these rows, so handing it to torch without a copy is safe.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _table_to_batch(table: pa.Table) -> Batch:
    return {name: arrow_to_torch(table.column(name)) for name in table.column_names}


def load_split(directory: str | Path, split: str, columns: Sequence[str] | None = None) -> Batch:
    """Read a whole split into memory: every modality as a float32 tensor (N, *shape), ``label`` as a
    tensor and ``sample_id`` as a list of str (``columns`` selects a subset)."""
    meta = read_meta(directory)
    selected = _columns_to_read(meta, columns, [*meta.tensor_columns, SAMPLE_ID])
    tables = [pq.read_table(file, columns=selected) for file in split_files(directory, split)]
    return _table_to_batch(pa.concat_tables(tables))


def iter_batches(
    directory: str | Path,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    columns: Sequence[str] | None = None,
) -> Iterator[Batch]:
    """Yield dicts of torch tensors with ``batch_size`` rows (the last one may be smaller).

    By default the keys are the modalities and ``label``, as in ``ray_dataset``; add ``sample_id`` to
    ``columns`` to get it as a list of str. Without shuffling the files are streamed; with shuffling the
    split is loaded into memory and permuted with ``seed``.
    """
    if batch_size < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    meta = read_meta(directory)
    selected = _columns_to_read(meta, columns, meta.tensor_columns)
    if shuffle:
        yield from _shuffled_batches(load_split(directory, split, selected), batch_size, seed, drop_last)
        return
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for file in split_files(directory, split):
        for record_batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=selected):
            pending.append(record_batch)
            pending_rows += record_batch.num_rows
            while pending_rows >= batch_size:
                table = pa.Table.from_batches(pending)
                yield _table_to_batch(table.slice(0, batch_size))
                pending = table.slice(batch_size).to_batches()
                pending_rows -= batch_size
    if pending_rows and not drop_last:
        yield _table_to_batch(pa.Table.from_batches(pending))


def _shuffled_batches(split: Batch, batch_size: int, seed: int, drop_last: bool) -> Iterator[Batch]:
    num_rows = len(next(iter(split.values())))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(num_rows))
    stop = num_rows - num_rows % batch_size if drop_last else num_rows
    for start in range(0, stop, batch_size):
        rows = order[start : start + batch_size]
        yield {
            name: [values[row] for row in rows.tolist()] if isinstance(values, list) else values[rows]
            for name, values in split.items()
        }


def ray_dataset(
    directory: str | Path,
    split: str,
    *,
    columns: Sequence[str] | None = None,
    preserve_order: bool = True,
    task_cpus: float | None = None,
) -> ray.data.Dataset:
    """The split as a Ray Data dataset (``ray.data.read_parquet`` over the split's files in order).

    By default only the tensor columns (modalities and ``label``) are read, so
    ``iter_torch_batches(batch_size=...)`` yields the same dicts as ``iter_batches``: torch cannot hold the
    string ``sample_id`` column, pass ``columns=[..., "sample_id"]`` and use ``iter_batches`` to get it.
    ``preserve_order`` keeps the file order (so the rows match the plain reader); it applies to this
    dataset only, and Ray Train replaces it with its ``DataConfig`` execution options for the datasets
    given to a trainer. ``task_cpus``: the CPUs each read task asks for (Ray's default: 1).
    """
    meta = read_meta(directory)
    selected = _columns_to_read(meta, columns, meta.tensor_columns)
    files = [str(file) for file in split_files(directory, split)]
    split_bytes = meta.splits.get(split, 0) * _row_bytes(meta, selected)
    # Left alone, Ray cuts a split into ~200 blocks (tens of rows each for MOSEI-sized samples) and then
    # re-assembles them into batches; blocks of ~32 MiB ingest about twice as fast.
    num_blocks = max(len(files), math.ceil(split_bytes / RAY_BLOCK_BYTES))
    dataset = read_parquet_files(files, selected, num_blocks, task_cpus)
    dataset.context.execution_options.preserve_order = preserve_order
    return dataset


def read_parquet_files(
    files: list[str], columns: list[str], num_blocks: int, task_cpus: float | None = None
) -> ray.data.Dataset:
    """``ray.data.read_parquet`` through Ray's V1 Parquet reader.

    Ray 2.60's default reader (DataSourceV2) starts a pool of 32 footer-reading actors each time a dataset
    executes, i.e. every epoch: seconds of start-up per epoch on a small node, for the tens of local files
    a dataset here has. The V1 reader lists them in-process. The reader is fixed when the dataset is
    built, so it holds wherever the dataset later runs (a Ray Train worker too).
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    default_reader = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(files, columns=columns, override_num_blocks=num_blocks, num_cpus=task_cpus)
    finally:
        context.use_datasource_v2 = default_reader


def _row_bytes(meta: DatasetMeta, columns: Sequence[str]) -> int:
    """In-memory bytes of one row of the tensor columns among ``columns`` (sample ids are not counted)."""
    shapes = {name: spec.shape for name, spec in meta.modalities.items()}
    shapes[LABEL] = meta.label_shape
    item_bytes = {name: 4 for name in meta.modalities} | {LABEL: {"int64": 8, "uint8": 1}.get(meta.label_dtype, 4)}
    return sum(item_bytes[name] * math.prod(shapes[name]) for name in columns if name in shapes)


def _prepare_digits(out_dir: Path, overwrite: bool = False) -> Path:
    from dynmm.data.digits import prepare_digits

    return prepare_digits(out_dir, overwrite=overwrite)


def _prepare_synthetic_mosei(out_dir: Path, overwrite: bool = False) -> Path:
    from dynmm.data.synthetic import BUILTIN_NUM_SAMPLES, generate_synthetic_mosei

    return generate_synthetic_mosei(out_dir, num_samples=BUILTIN_NUM_SAMPLES, overwrite=overwrite)


BUILTIN_DATASETS: dict[str, Callable[..., Path]] = {
    "digits": _prepare_digits,
    "synthetic-mosei": _prepare_synthetic_mosei,
}


def _builtin_meta(name: str) -> DatasetMeta | None:
    """The metadata a built-in dataset is written with; None for one registered without a plan (tests)."""
    from dynmm.data.digits import digits_meta
    from dynmm.data.synthetic import synthetic_mosei_meta

    planned = {"digits": lambda: digits_meta(seed=0), "synthetic-mosei": synthetic_mosei_meta}.get(name)
    return planned() if planned else None


def locate_dataset(name_or_path: str | Path, data_root: str | Path) -> tuple[Path, DatasetMeta]:
    """Where ``resolve_dataset`` finds (or will prepare) a dataset and its metadata, writing nothing: for a
    built-in dataset not prepared yet, the metadata it will be written with (no row counts or files yet),
    so a pipeline can be checked against it before anything is written."""
    name = str(name_or_path)
    planned = _builtin_meta(name) if name in BUILTIN_DATASETS else None
    if planned is not None and not (Path(data_root) / name / META_FILE).is_file():
        return Path(data_root) / name, planned
    directory = resolve_dataset(name_or_path, data_root)
    return directory, read_meta(directory)


def resolve_dataset(name_or_path: str | Path, data_root: str | Path) -> Path:
    """The folder of a dataset: a built-in name is prepared under ``data_root/<name>`` on first use (one
    process prepares it while the others wait on a lock) and reused afterwards; anything else must be an
    existing dataset folder with a dataset.json."""
    name = str(name_or_path)
    if name in BUILTIN_DATASETS:
        return _prepared_builtin(name, Path(data_root))
    path = Path(name_or_path).expanduser()
    if not (path / META_FILE).is_file():
        raise DatasetError(
            f"dataset {name!r}: not a built-in dataset ({', '.join(BUILTIN_DATASETS)}) and not a folder "
            f"with {META_FILE}; prepare one with `dynmm data prepare`"
        )
    return path


def _prepared_builtin(name: str, data_root: Path) -> Path:
    out_dir = data_root / name
    if (out_dir / META_FILE).is_file() and _outdated_builtin(name, out_dir) is None:
        return out_dir
    data_root.mkdir(parents=True, exist_ok=True)
    with open(data_root / f".{name}.lock", "w") as lock_file, _locked(lock_file):
        if not (out_dir / META_FILE).is_file():
            BUILTIN_DATASETS[name](out_dir)
        elif (reason := _outdated_builtin(name, out_dir)) is not None:
            print(f"dataset {name} at {out_dir} was prepared by an older version ({reason}): preparing it again",
                  file=sys.stderr, flush=True)
            BUILTIN_DATASETS[name](out_dir, overwrite=True)
    return out_dir


def _outdated_builtin(name: str, out_dir: Path) -> str | None:
    """Why a prepared built-in dataset is not what this version writes (None: it is): a model served from it
    would expect other inputs (its input transforms differ), or its files cannot be verified (no checksums)."""
    meta, planned = read_meta(out_dir), _builtin_meta(name)
    if planned is None:
        return None
    if meta.input_transforms != planned.input_transforms:
        return "its input transforms differ"
    if not meta.files:
        return "no file checksums"
    return None


@contextlib.contextmanager
def _locked(lock_file: Any) -> Iterator[None]:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(lock_file, fcntl.LOCK_UN)
