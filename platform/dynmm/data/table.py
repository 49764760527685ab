"""``dynmm data prepare table``: a user's Parquet or CSV table to a dataset, streamed in record batches in
three passes, so memory stays flat however many rows the file has:

1. labels: the label (and split) column only: the classes, their counts and the user's label names, which fix
   each row's split (``dynmm.data.table_split``);
2. statistics: every row's numbers: per-feature mean and std of the complete train rows (float64, batches
   merged by Chan's formula) and the rows with NaN, inf or missing cells; the complete rows are staged per
   split on disk as they go by (``dynmm.data.table_stage``), so the user's file is decoded once for both;
3. write: each split's staged rows, standardised with the train statistics, through the atomic
   ``dataset_writer`` (per-file rows, bytes and SHA-256 recorded; nothing left behind on failure).

``dataset.json`` records what a served model needs to take the user's original rows: the source columns of
each modality, the label names, the standardisation (``DatasetMeta.source_table``, ``label_names``,
``input_transforms``). A CSV is parsed once, into a temporary Arrow stream beside the output; the staged rows
sit there too, and both are removed when the import ends.

Imports nothing from models, ray or mlflow.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dynmm.data.format import LABEL, SAMPLE_ID, SPLITS, DatasetMeta, InputTransform, ModalitySpec
from dynmm.data.overlap import WorkBehind, read_ahead
from dynmm.data.table_columns import label_indices, modality_values
from dynmm.data.table_labels import LabelSurvey, label_values, survey_labels
from dynmm.data.table_plan import CLASSIFICATION, TablePlan, TableRequest, plan_table
from dynmm.data.table_split import DEFAULT_FRACTIONS, SplitDealer, parse_fractions
from dynmm.data.table_stage import SOURCE_ROWS, StagedSplits
from dynmm.data.writer import DatasetWriter, dataset_writer, refuse_existing_output
from dynmm.errors import DatasetError

BATCH_ROWS = 32768
CSV_BLOCK_BYTES = 1 << 20  # measured: 1 MiB blocks parse as fast as read_csv's, in a tenth of the memory of 16
MOMENT_BLOCK_ROWS = 8192
PART_BYTES = 32 << 20  # rows are written in Parquet files of about this many bytes (in memory)


def convert_table(
    src: str | Path, out_dir: str | Path, request: TableRequest, *, standardize: bool = True,
    drop_incomplete: bool = False, overwrite: bool = False, batch_rows: int = BATCH_ROWS,
    csv_block_bytes: int = CSV_BLOCK_BYTES,
) -> Path:
    """Import the table at ``src`` (Parquet, or CSV by its suffix) into the dataset folder ``out_dir``.

    ``standardize``: store each feature as (value - train mean) / train std and record that as the
    modalities' input transform; ``drop_incomplete``: drop rows with NaN, inf or missing cells (counted in
    ``params["dropped_incomplete_rows"]``) rather than refuse the table. ``batch_rows`` and
    ``csv_block_bytes`` bound what is read at a time (the results do not depend on them)."""
    src, out_dir = Path(src), Path(os.path.abspath(out_dir))
    if not src.is_file():
        raise DatasetError(f"{src}: file not found")
    if request.split_column is not None and request.split is not None:
        raise DatasetError("--split and --split-column: give one (a split column says where each row goes)")
    fractions = parse_fractions(DEFAULT_FRACTIONS if request.split is None else request.split)
    if batch_rows < 1:
        raise DatasetError(f"batch_rows must be >= 1, got {batch_rows}")
    refuse_existing_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.table-", dir=out_dir.parent))
    try:
        plan = plan_table(src, request, spill=scratch / "table.arrow", batch_rows=batch_rows,
                          csv_block_bytes=csv_block_bytes)
        labels = survey_labels(plan, src.name)
        staged = StagedSplits(scratch, plan.shapes, (plan.label_positions,) if plan.label_positions else ())
        features = _survey_and_stage(_RowReader(plan, labels, fractions, request.seed), staged, drop_incomplete)
        _refuse_gaps(src.name, plan, features, drop_incomplete)
        transforms = {name: moments.transform(plan.shapes[name]) for name, moments in features.moments.items()}
        params = _params(request, fractions, standardize, features.incomplete_rows if drop_incomplete else None)
        meta = _dataset_meta(src, plan, labels, transforms if standardize else {}, params)
        with dataset_writer(out_dir, meta, overwrite=overwrite, source_name=src.name) as writer:
            _write_staged(staged, meta, writer)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out_dir


class Moments:
    """Per-feature count, mean and sum of squared deviations of the train rows, in float64, so the statistics
    need one pass and no rows kept: rows are taken in blocks of ``MOMENT_BLOCK_ROWS`` (however the table was
    batched, so the same table gives the same numbers to the bit) and the blocks merged in order (Chan, Golub
    and LeVeque's pairwise update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.squares = 0, 0.0, 0.0
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def add(self, values: np.ndarray) -> None:
        """Add a batch of samples (N, *shape); a feature is an element of a vector, the last axis of a
        sequence (T, D), the first axis (a channel) of an image (C, H, W)."""
        self.pending.append(_feature_rows(values))
        self.pending_rows += len(self.pending[-1])
        if self.pending_rows < MOMENT_BLOCK_ROWS:
            return
        rows = np.concatenate(self.pending)
        whole = len(rows) - len(rows) % MOMENT_BLOCK_ROWS
        for start in range(0, whole, MOMENT_BLOCK_ROWS):
            self._merge(rows[start : start + MOMENT_BLOCK_ROWS])
        self.pending, self.pending_rows = [rows[whole:]], len(rows) - whole

    def _merge(self, features: np.ndarray) -> None:
        rows = len(features)
        # Deviations from the block's mean rounded to float32 are exact enough in float32 (half the memory of
        # float64); their sums, and the squares' sums, are taken in float64, less the rounding's share.
        shift = (np.add.reduce(features, axis=0, dtype=np.float64) / rows).astype(features.dtype)
        deviations = features - shift
        offset = np.add.reduce(deviations, axis=0, dtype=np.float64) / rows
        squares = np.einsum("ij,ij->j", deviations, deviations, dtype=np.float64) - rows * np.square(offset)
        count = self.count + rows
        delta = shift + offset - self.mean
        self.mean = self.mean + delta * (rows / count)
        self.squares = self.squares + squares + np.square(delta) * (self.count * rows / count)
        self.count = count

    def transform(self, shape: tuple[int, ...]) -> InputTransform:
        """The standardize transform (the rows still pending merged first), its mean and std shaped to
        broadcast against one sample of ``shape``. A feature without spread (std 0, or under a sixth of
        float32's resolution at its mean: rounding, not data) keeps std 1."""
        if self.pending_rows:
            self._merge(np.concatenate(self.pending))
            self.pending, self.pending_rows = [], 0
        std = np.sqrt(self.squares / self.count)
        std = np.where(std > 1e-8 * np.abs(self.mean), std, 1.0)
        broadcast = (shape[0], 1, 1) if len(shape) == 3 else (shape[-1],)
        return InputTransform(kind="standardize", mean=np.reshape(self.mean, broadcast).tolist(),
                              std=np.reshape(std, broadcast).tolist())


def _feature_rows(values: np.ndarray) -> np.ndarray:
    """(samples, features): one row per vector, per time step of a sequence, per pixel of an image."""
    if values.ndim == 4:
        return np.moveaxis(values, 1, -1).reshape(-1, values.shape[1])
    return values.reshape(-1, values.shape[-1])


@dataclass
class _Rows:
    """One batch of the table: each row's split (-1: no label), its numbers per modality as the source gives
    them, its label as stored, whether it is complete, and the batch itself (for ids)."""

    first_row: int
    codes: np.ndarray
    values: dict[str, np.ndarray]
    labels: np.ndarray
    complete: np.ndarray
    batch: pa.Table


class _RowReader:
    """Reads the table batch by batch as ``_Rows``; each pass deals the splits afresh, to the same rows."""

    def __init__(self, plan: TablePlan, labels: LabelSurvey, fractions: tuple[float, ...], seed: int):
        self.plan, self.labels, self.fractions, self.seed = plan, labels, fractions, seed

    def __iter__(self) -> Iterator[_Rows]:
        plan = self.plan
        dealer = None if plan.split_column else SplitDealer(self.labels.class_counts, self.fractions, self.seed)
        with contextlib.closing(read_ahead(plan.file.batches(plan.columns))) as record_batches:
            yield from self._rows(record_batches, dealer)

    def _rows(self, record_batches: Iterator[pa.RecordBatch], dealer: SplitDealer | None) -> Iterator[_Rows]:
        """Each batch's splits, labels and numbers (the batches are read ahead in a thread meanwhile)."""
        plan, first_row = self.plan, 0
        for record_batch in record_batches:
            batch = pa.Table.from_batches([record_batch])
            labels, labelled = label_values(batch, plan, self.labels.names, first_row)
            if dealer is None:
                codes = np.where(labelled, label_indices(batch.column(plan.split_column), SPLITS), -1)
            else:
                classes = labels if plan.task in CLASSIFICATION else np.zeros(len(labels), dtype=np.int64)
                codes = dealer.deal(np.where(labelled, classes, -1))
            values = {name: modality_values(batch, name, source, plan.shapes[name], first_row)
                      for name, source in plan.modalities.items()}
            complete = labelled.copy()
            for array in values.values():
                complete &= np.isfinite(array.reshape(len(array), -1)).all(axis=1)
            yield _Rows(first_row, codes, values, labels, complete, batch)
            first_row += batch.num_rows


@dataclass
class _FeatureSurvey:
    moments: dict[str, Moments]
    complete_rows: np.ndarray  # per split
    bad_cells: Counter  # column -> NaN, inf or missing cells
    incomplete_rows: int = 0
    first_incomplete_row: int | None = None


def _survey_and_stage(rows: _RowReader, staged: StagedSplits, drop_incomplete: bool) -> _FeatureSurvey:
    """Pass 2: complete rows per split and where cells are missing, here; the train rows' per-feature
    moments and the staging of the complete rows per split (no longer once a missing cell means the table
    will be refused), behind, on a worker thread (``WorkBehind``)."""
    plan = rows.plan
    survey = _FeatureSurvey({name: Moments() for name in plan.modalities}, np.zeros(len(SPLITS), np.int64), Counter())
    try:
        with WorkBehind() as behind:
            for batch in rows:
                incomplete = ~batch.complete
                if incomplete.any():
                    survey.incomplete_rows += int(incomplete.sum())
                    if survey.first_incomplete_row is None:
                        survey.first_incomplete_row = batch.first_row + int(np.flatnonzero(incomplete)[0])
                    _count_bad_cells(survey.bad_cells, plan, batch)
                survey.complete_rows += np.bincount(batch.codes[batch.complete], minlength=len(SPLITS))
                stage = drop_incomplete or not survey.incomplete_rows
                behind.submit(_absorb, survey.moments, staged if stage else None, plan, batch)
    finally:
        staged.close()
    return survey


def _absorb(moments: dict[str, Moments], staged: StagedSplits | None, plan: TablePlan, batch: _Rows) -> None:
    """Add a batch's complete train rows to the moments and stage its complete rows (unless ``staged`` is None)."""
    train = batch.complete & (batch.codes == 0)
    for name, values in batch.values.items():
        moments[name].add(values[train])
    if staged is not None:
        _stage(staged, plan, batch)


def _stage(staged: StagedSplits, plan: TablePlan, batch: _Rows) -> None:
    for code, split in enumerate(SPLITS):
        kept = np.flatnonzero(batch.complete & (batch.codes == code))
        if len(kept) == 0:
            continue
        columns = {name: values[kept] for name, values in batch.values.items()}
        columns[LABEL] = batch.labels[kept]
        columns[SOURCE_ROWS] = kept + batch.first_row
        row_numbers = pa.array(columns[SOURCE_ROWS]).cast(pa.string())
        ids = batch.batch.column(plan.id_column).take(kept).combine_chunks().cast(pa.string()) if (
            plan.id_column) else row_numbers
        columns[SAMPLE_ID] = pc.coalesce(ids, row_numbers)  # an empty id cell: the row number
        staged.add(split, columns)


def _count_bad_cells(bad_cells: Counter, plan: TablePlan, batch: _Rows) -> None:
    for name, source in plan.modalities.items():
        finite = np.isfinite(batch.values[name].reshape(len(batch.complete), -1))
        if source.vector_column:
            bad_cells[source.columns[0]] += int((~finite.all(axis=1)).sum())
        else:
            for column, count in zip(source.columns, (~finite).sum(axis=0), strict=True):
                bad_cells[column] += int(count)
    bad_cells[",".join(plan.label_columns)] += int((batch.codes < 0).sum())
    for column in [column for column, count in bad_cells.items() if count == 0]:
        del bad_cells[column]


def _refuse_gaps(file: str, plan: TablePlan, survey: _FeatureSurvey, drop_incomplete: bool) -> None:
    """Refuse NaN/inf/missing cells (unless they are to be dropped) and a split left without rows."""
    if survey.incomplete_rows and not drop_incomplete:
        worst = survey.bad_cells.most_common()
        cells = ", ".join(f"{column!r} {count}" for column, count in worst[:4]) + (", ..." if len(worst) > 4 else "")
        raise DatasetError(
            f"{file}: {survey.incomplete_rows} row(s) have NaN, inf or missing cells (cells per column: {cells}; "
            f"first at row {survey.first_incomplete_row}); pass --drop-incomplete to drop those rows"
        )
    for split, count in zip(SPLITS, survey.complete_rows, strict=True):
        if count == 0:
            where = f"no complete row has {split!r} in column {plan.split_column!r}" if plan.split_column else (
                f"{int(survey.complete_rows.sum())} complete row(s) are too few for the --split fractions")
            raise DatasetError(f"{file}: split {split!r} would be empty: {where}")


def _params(request: TableRequest, fractions: tuple[float, ...], standardize: bool, dropped: int | None) -> dict:
    params: dict = {"standardize": standardize}
    if request.split_column is None:
        params |= {"split_fractions": list(fractions), "seed": request.seed,
                   "split_method": "stratified by class" if request.task in CLASSIFICATION else "random"}
    else:
        params["split_method"] = f"column {request.split_column!r}"
    if dropped is not None:
        params["dropped_incomplete_rows"] = dropped
    return params


def _dataset_meta(src: Path, plan: TablePlan, labels: LabelSurvey, transforms: dict, params: dict) -> DatasetMeta:
    return DatasetMeta(
        name=src.name.split(".")[0],
        task=plan.task,
        num_classes=None if plan.task == "regression" else len(labels.names),
        modalities={name: ModalitySpec(shape=shape) for name, shape in plan.shapes.items()},
        input_transforms=transforms,
        label_names=labels.names,
        source_table=plan.source_table(),
        source=str(src.resolve()),
        params=params,
    )


# Splits written side by side, each by its own thread: train (the most rows) alone, valid and test together.
WRITER_SPLITS = (("train",), ("valid", "test"))


def _write_staged(staged: StagedSplits, meta: DatasetMeta, writer: DatasetWriter) -> None:
    """Pass 3: each split's staged rows, transformed, in Parquet files of about ``PART_BYTES`` each. Train is
    written by one thread while valid and test are by another; in each, reading and transforming the next part
    overlaps encoding and hashing this one (``read_ahead``)."""
    with ThreadPoolExecutor(max_workers=len(WRITER_SPLITS), thread_name_prefix="write-split") as pool:
        writing = [pool.submit(_write_splits, staged, meta, writer, splits) for splits in WRITER_SPLITS]
        for done in writing:
            done.result()


def _write_splits(staged: StagedSplits, meta: DatasetMeta, writer: DatasetWriter, splits: tuple[str, ...]) -> None:
    row_bytes = 4 * sum(math.prod(spec.shape) for spec in meta.modalities.values()) + 8 * max(
        1, math.prod(meta.label_shape))
    for split in splits:
        parts = staged.parts(split, max(1, PART_BYTES // row_bytes), meta.input_transforms)
        with contextlib.closing(read_ahead(parts)) as transformed:
            for columns in transformed:
                source_rows = columns.pop(SOURCE_ROWS)
                writer.write(split, columns, source_rows=source_rows)
