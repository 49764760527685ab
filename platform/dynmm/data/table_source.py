"""Reading a user's table for ``dynmm data prepare table``: its column names and types, the ``--modality``
specs resolved against them (a misspelt column is named with the close ones), and record batches of the
columns needed, a bounded number of rows at a time, so memory stays flat however long the file is.

A Parquet file is read with ``ParquetFile.iter_batches`` each pass. A CSV file is parsed once by pyarrow's
streaming reader, a block at a time, into a temporary Arrow IPC stream (numbers as float32, vector text cells
as lists, labels dictionary-encoded), which every pass reads back: parsing text is the slow
part, and it happens once.

Imports nothing from models, ray or mlflow.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dynmm.data.format import LABEL, SAMPLE_ID
from dynmm.data.overlap import read_ahead
from dynmm.data.table_columns import parse_vectors
from dynmm.errors import DatasetError

MODALITY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
RESHAPE = re.compile(r"^(?P<columns>.*):(?P<shape>[0-9]+(?:x[0-9]+)*)$")
SNIFF_BYTES = 1 << 20  # what a CSV's column types are inferred from
PARQUET_BUFFER_BYTES = 1 << 20  # read column chunks through a buffer: memory bounded by batches, not row groups


@dataclass(frozen=True)
class ModalityRequest:
    """One ``--modality NAME=COLUMN[,COLUMN...][:AxB...]`` resolved against the table's columns."""

    name: str
    columns: tuple[str, ...]
    shape: tuple[int, ...] | None  # None: not reshaped (a vector of the columns' or the list's numbers)


def resolve_column(name: str, known: Sequence[str], what: str) -> str:
    """``name`` if the table has that column (else the same name without surrounding spaces); otherwise a
    DatasetError naming it and the close ones."""
    for candidate in (name, name.strip()):
        if candidate in known:
            return candidate
    close = difflib.get_close_matches(name.strip(), known, n=3, cutoff=0.5)
    hint = f"; close: {', '.join(repr(column) for column in close)}" if close else ""
    shown = ", ".join(repr(column) for column in known[:12]) + (", ..." if len(known) > 12 else "")
    raise DatasetError(f"{what}: unknown column {name!r}{hint} (the table has {shown})")


def parse_modality(text: str, known: Sequence[str]) -> ModalityRequest:
    """``NAME=COLUMN[,COLUMN...][:AxB...]``. Column names may hold any character but ``,`` and ``=``; a
    trailing ``:50x74`` is a reshape unless the text with it names a column."""
    name, equals, spec = text.partition("=")
    name = name.strip()
    if not equals or not spec.strip():
        raise DatasetError(f"--modality {text!r}: expected NAME=COLUMN[,COLUMN...] (optionally :AxB to reshape)")
    if not MODALITY_NAME.fullmatch(name) or name in (LABEL, SAMPLE_ID):
        raise DatasetError(f"--modality {text!r}: the name {name!r} must start with a letter and hold only letters, "
                           f"digits, '_' and '-', and not be {LABEL!r} or {SAMPLE_ID!r}")
    shape = None
    reshape = RESHAPE.match(spec)
    if reshape and spec.split(",")[-1] not in known and spec.split(",")[-1].strip() not in known:
        spec, shape = reshape["columns"], tuple(int(size) for size in reshape["shape"].split("x"))
        if not 1 <= len(shape) <= 3 or 0 in shape:
            raise DatasetError(f"--modality {text!r}: reshape to a vector (D), a sequence (TxD) or an image (CxHxW) "
                               f"of positive sizes, got {reshape['shape']!r}")
    columns = tuple(resolve_column(column, known, f"--modality {name}") for column in spec.split(","))
    return ModalityRequest(name, columns, shape)


class TableFile:
    """A Parquet file, or the Arrow file a CSV was parsed into, read as record batches of chosen columns."""

    def __init__(self, path: Path, file_format: str, schema: pa.Schema, batch_rows: int):
        self.path, self.file_format, self.schema, self.batch_rows = path, file_format, schema, batch_rows
        self.dictionary_columns: list[str] = []  # text columns of few values, read dictionary-encoded

    def batches(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        if self.file_format == "parquet":
            parquet = pq.ParquetFile(self.path, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES,
                                     read_dictionary=self.dictionary_columns)
            yield from parquet.iter_batches(batch_size=self.batch_rows, columns=list(columns))
            return
        with pa.OSFile(str(self.path)) as source:  # not memory-mapped: what was read leaves memory
            for batch in pa.ipc.open_stream(source):
                batch = batch.select(list(columns))
                for start in range(0, batch.num_rows, self.batch_rows):
                    yield batch.slice(start, self.batch_rows)


def parquet_table(path: Path, batch_rows: int) -> TableFile:
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as error:
        raise DatasetError(f"{path}: not a readable Parquet file ({error})") from None
    return TableFile(path, "parquet", schema, batch_rows)


def csv_schema(path: Path, block_bytes: int) -> tuple[pa.Schema, pa.RecordBatch]:
    """The CSV's header with the types pyarrow infers from its first block (of at most 1 MiB), and that block."""
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=min(block_bytes, SNIFF_BYTES)),
                                convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
        first = reader.read_next_batch()
    except StopIteration:
        raise DatasetError(f"{path}: holds a header but no rows") from None
    except (OSError, pa.ArrowException) as error:
        raise DatasetError(f"{path}: not a readable CSV file ({str(error).splitlines()[0]})") from None
    reader.close()
    return first.schema, first


@dataclass(frozen=True)
class CsvColumns:
    """How a CSV's needed columns are read: ``types`` (each column's type, in the order kept), the text
    columns holding vectors, and the text columns of few values (labels, splits) to dictionary-encode."""

    header: Sequence[str]
    types: dict[str, pa.DataType]
    vectors: set[str]
    dictionary: set[str]


def spill_csv(path: Path, columns: CsvColumns, spill: Path, block_bytes: int, batch_rows: int) -> pa.Schema:
    """Parse the CSV's needed columns once, vector text cells into lists, numbers into float32, into an Arrow
    stream at ``spill`` in batches of about ``batch_rows`` rows; its schema. Parsing the next blocks overlaps
    the work on the last ones (``read_ahead``)."""
    convert = pacsv.ConvertOptions(column_types=columns.types, include_columns=list(columns.types),
                                   strings_can_be_null=True)
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=block_bytes), convert_options=convert)
    except pa.ArrowInvalid as error:
        raise DatasetError(f"{path.name}: {_csv_problem(error, columns.header)}") from None
    writer, blocks = None, read_ahead(_blocks(path, reader, columns.header))
    try:
        for batch in _regrouped(_parsed_blocks(path, blocks, columns), batch_rows):
            writer = writer or pa.ipc.new_stream(str(spill), batch.schema)  # a stream: each batch its dictionary
            writer.write_batch(batch)
    finally:
        blocks.close()  # the producer thread stops before the reader closes
        reader.close()
        if writer is not None:
            writer.close()
    if writer is None:
        raise DatasetError(f"{path.name}: holds no rows")
    with pa.OSFile(str(spill)) as source:
        return pa.ipc.open_stream(source).schema


def _blocks(path: Path, reader: pacsv.CSVStreamingReader, header: Sequence[str]) -> Iterator[pa.RecordBatch]:
    rows = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as error:
            raise DatasetError(f"{path.name}: after row {rows}: {_csv_problem(error, header)}") from None
        rows += batch.num_rows
        yield batch


def _parsed_blocks(path: Path, blocks: Iterable[pa.RecordBatch], columns: CsvColumns) -> Iterator[pa.RecordBatch]:
    first_row = 0
    for batch in blocks:
        yield _parsed(batch, columns, first_row)
        first_row += batch.num_rows


def _regrouped(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Small batches (a CSV block of 1 MiB is about a thousand rows) gathered into batches of >= ``rows``."""
    pending, pending_rows = [], 0
    for batch in batches:
        pending.append(batch)
        pending_rows += batch.num_rows
        if pending_rows >= rows:
            yield _joined(pending)
            pending, pending_rows = [], 0
    if pending:
        yield _joined(pending)


def _joined(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).unify_dictionaries().combine_chunks().to_batches()[0]


def _parsed(batch: pa.RecordBatch, columns: CsvColumns, first_row: int) -> pa.RecordBatch:
    """A parsed CSV block as the spill holds it."""
    arrays = []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if name in columns.vectors:
            column = pc.cast(parse_vectors(column, what=f"column {name!r}", first_row=first_row),
                             pa.list_(pa.float32()))
        elif name in columns.dictionary:
            column = pc.cast(column, pa.dictionary(pa.int32(), pa.string()))
        elif pa.types.is_floating(column.type):
            column = pc.cast(column, pa.float32())
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _csv_problem(error: pa.ArrowInvalid, header: Sequence[str]) -> str:
    """pyarrow's message about a cell, with the column named rather than numbered."""
    message = str(error).splitlines()[0]
    found = re.search(r"In CSV column #(\d+): (.*)", message)
    if found is None:
        return message
    index = int(found[1])
    column = header[index] if index < len(header) else f"#{index}"
    return f"column {column!r}: {found[2]}"
