"""The complete rows of each split, staged on disk between the table import's statistics pass and its write
pass, so that the user's file is decoded once for both (decoding Parquet or parsing CSV is the costly part):
one Arrow IPC stream per split in a scratch folder, written batch by batch as the table streams by, read back
in parts of a fixed row count through a plain file (not memory-mapped: what was read leaves memory), each
staged batch transformed straight into its place in the part.

Imports nothing from models, ray or mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa

from dynmm.data.format import LABEL, SAMPLE_ID, SPLITS, InputTransform

SOURCE_ROWS = "source_row"  # each staged row's row number in the user's file, for error messages


def _as_arrow(values) -> pa.Array:
    if isinstance(values, pa.Array):
        return values
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return flat if values.ndim == 1 else pa.FixedSizeListArray.from_arrays(flat, math.prod(values.shape[1:]))


class StagedSplits:
    """Writes each split's rows (modalities as the source gives them, label as stored, sample id, source row)
    to ``<folder>/<split>.arrows``; ``parts`` reads them back as numpy columns, ``part_rows`` rows at a time."""

    def __init__(self, folder: Path, shapes: dict[str, tuple[int, ...]], label_shape: tuple[int, ...]):
        self.folder, self.shapes, self.label_shape = folder, shapes, label_shape
        self.writers: dict[str, pa.ipc.RecordBatchStreamWriter] = {}

    def add(self, split: str, columns: dict) -> None:
        """Append rows: ``columns`` maps every modality, ``label``, ``sample_id`` and ``source_row``."""
        batch = pa.RecordBatch.from_pydict({name: _as_arrow(values) for name, values in columns.items()})
        if split not in self.writers:
            self.writers[split] = pa.ipc.new_stream(str(self.folder / f"{split}.arrows"), batch.schema)
        self.writers[split].write_batch(batch)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()

    def parts(self, split: str, part_rows: int, transforms: Mapping[str, InputTransform]) -> Iterator[dict]:
        """The split's rows, ``part_rows`` at a time (the last part smaller), as numpy columns (``sample_id``
        stays a pyarrow string array), each modality with a transform transformed."""
        path = self.folder / f"{split}.arrows"
        if split not in SPLITS or not path.is_file():
            return
        pending: list[pa.RecordBatch] = []
        rows = 0
        with pa.OSFile(str(path)) as file:
            for batch in pa.ipc.open_stream(file):
                pending.append(batch)
                rows += batch.num_rows
                while rows >= part_rows:
                    table = pa.Table.from_batches(pending)
                    yield self._numpy(table.slice(0, part_rows), transforms)
                    pending, rows = table.slice(part_rows).to_batches(), rows - part_rows
        if rows:
            yield self._numpy(pa.Table.from_batches(pending), transforms)

    def _numpy(self, table: pa.Table, transforms: Mapping[str, InputTransform]) -> dict:
        columns = {}
        for name in table.column_names:
            shape = self.shapes.get(name, self.label_shape if name == LABEL else ())
            if name in transforms:  # each staged batch transformed straight into its place in the part
                columns[name] = np.empty((table.num_rows, *shape), dtype=np.float32)
                start = 0
                for chunk in table.column(name).chunks:
                    source = chunk.flatten().to_numpy().reshape(len(chunk), *shape)
                    transforms[name].apply(source, out=columns[name][start : start + len(chunk)])
                    start += len(chunk)
                continue
            column = table.column(name).combine_chunks()
            if name == SAMPLE_ID:
                columns[name] = column
            elif shape:
                columns[name] = column.flatten().to_numpy().reshape(len(column), *shape)
            else:
                columns[name] = column.to_numpy()
        return columns
