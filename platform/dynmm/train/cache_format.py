"""The expert-output cache as readers see it: its layout, its manifest, the checks on its files and reading it.

Layout, under the experts' folder (``experts_uri``: a local or shared folder, or any pyarrow filesystem URI such
as ``s3://``)::

    output-cache/<key>/manifest.json                                 written last: the build it names is the cache
    output-cache/<key>/<build>/split=<split>/part-<task>-....parquet  rows in the dataset's order

A build writes into a folder of its own (``<build>``, unique per build) and becomes the cache only when the
manifest naming it is written, one small object put last: object stores have no folder rename, and a reader
never trusts files the manifest does not list. Columns: ``sample_id``, ``label`` and the raw modalities the gate
reads, as in the dataset; ``expert_outputs`` (P, *out) and, for a gate over an expert's confidence,
``gate_features`` (F,), both float32 ``fixed_shape_tensor``. Every file is checked against the manifest before it
is read; a damaged one is a ``DatasetError`` naming it. Built by ``dynmm.train.expert_cache``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from dynmm.data.format import LABEL, FileRecord
from dynmm.data.readers import arrow_to_torch
from dynmm.errors import DatasetError
from dynmm.models.dynmm import FrozenOutputs
from dynmm.train.store import filesystem_of, is_local, join

CACHE_FOLDER = "output-cache"
MANIFEST_FILE = "manifest.json"
EXPERT_OUTPUTS = "expert_outputs"
GATE_FEATURES = "gate_features"
CACHE_FORMAT_VERSION = 2
SPLIT = "split"  # the column that carries each row's split through the build, written as the folder name


class CachedFile(FileRecord):
    """A cache file's record: rows, bytes and SHA-256 as a dataset's files have, and the modification time its
    filesystem gave it when it was written (an object replaced since has another)."""

    modified_ns: int


class CacheManifest(BaseModel):
    """What ``manifest.json`` records: what the cache was computed from, the build folder that holds it and every
    file of it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int
    identity: dict[str, Any]
    gate_modalities: tuple[str, ...]
    build: str
    splits: dict[str, dict[str, CachedFile]]  # split -> file name -> record, in row order


@dataclass(frozen=True)
class ExpertOutputCache:
    """A built cache: where it lies (a local path or a URI, its key's folder) and its manifest. Read it with
    ``read_cache_split`` or ``cache_ray_dataset``."""

    location: str
    manifest: CacheManifest

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest.splits)

    @property
    def tensor_columns(self) -> list[str]:
        """The columns that become torch tensors: the gate's raw modalities, ``label``, the frozen outputs."""
        frozen = [EXPERT_OUTPUTS, *([GATE_FEATURES] if self.manifest.identity["gate_features"] else [])]
        return [*self.manifest.gate_modalities, LABEL, *frozen]

    @property
    def total_bytes(self) -> int:
        """The bytes of every file of the cache, as written."""
        return sum(record.bytes for records in self.manifest.splits.values() for record in records.values())

    def split_folder(self, split: str) -> str:
        return join(self.location, self.manifest.build, f"{SPLIT}={split}")

    def files(self, split: str) -> list[str]:
        """The split's files (local paths or URIs, as ``location``), in row order."""
        if split not in self.manifest.splits:
            raise DatasetError(f"{self.location}: the expert-output cache has no split {split!r} "
                               f"(it has {', '.join(self.splits)})")
        return [join(self.split_folder(split), name) for name in self.manifest.splits[split]]


def cache_root(experts_uri: str) -> str:
    """``<experts_uri>/output-cache``: the caches of the experts at ``experts_uri``, one folder per key."""
    return join(experts_uri, CACHE_FOLDER)


def open_expert_cache(location: str) -> ExpertOutputCache:
    """The cache at ``location`` (a key's folder) with its manifest; a missing or malformed manifest is a
    ``DatasetError``."""
    filesystem, root = filesystem_of(location)
    path = join(location, MANIFEST_FILE)
    try:
        with filesystem.open_input_stream(f"{root}/{MANIFEST_FILE}") as stream:
            manifest = CacheManifest.model_validate_json(stream.read())
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found; {location} is not an expert-output cache") from None
    except (OSError, ValidationError) as error:
        problem = str(error).splitlines()[0][:200]
        raise DatasetError(f"{path}: damaged expert-output cache manifest ({problem}); {_rebuild(location)}") from None
    if manifest.format_version != CACHE_FORMAT_VERSION:
        raise DatasetError(f"{path}: cache format {manifest.format_version}, expected {CACHE_FORMAT_VERSION}; "
                           f"{_rebuild(location)}")
    return ExpertOutputCache(location, manifest)


def has_manifest(location: str) -> bool:
    filesystem, root = filesystem_of(location)
    return filesystem.get_file_info(f"{root}/{MANIFEST_FILE}").type == pyarrow.fs.FileType.File


def verify_cache_split(cache: ExpertOutputCache, split: str) -> None:
    """Every file of ``split`` is the one written and no other is there: a damaged cache is a ``DatasetError``
    naming the file, never a wrong result. One listing gives each file's size and modification time; where the
    cache is on a local or shared folder, every file's SHA-256, Parquet footer and rows are checked (a file
    there can be changed in place). An object on object storage is put whole, so a truncated or half-written one
    cannot appear and a replaced one has a new modification time; hashing it would download the cache once more
    at every open."""
    filesystem, folder = filesystem_of(cache.split_folder(split))
    expected = dict(zip(cache.files(split), cache.manifest.splits[split].values(), strict=True))
    found = {info.base_name: info for info in filesystem.get_file_info(pyarrow.fs.FileSelector(folder,
                                                                                              allow_not_found=True))
             if info.type == pyarrow.fs.FileType.File}
    extra = sorted(set(found) - set(cache.manifest.splits[split]))
    if extra:
        raise DatasetError(f"{join(cache.split_folder(split), extra[0])}: not part of the expert-output cache (its "
                           f"manifest does not list it); {_rebuild(cache.location)}")
    local = is_local(cache.location)
    for file, record in expected.items():
        problem = _listed_problem(found.get(file.rsplit("/", 1)[-1]), record, local)
        if problem is None and local:
            problem = _content_problem(filesystem, filesystem_of(file)[1], record)
        if problem:
            raise DatasetError(f"{file}: {problem}; {_rebuild(cache.location)}")


def _listed_problem(info: pyarrow.fs.FileInfo | None, record: CachedFile, local: bool) -> str | None:
    """What the listing shows wrong: a missing file, another size, or (on object storage, where the content is
    not hashed) another modification time; a local file's time changes with a copy, its content is checked."""
    if info is None:
        return "missing (the cache's manifest lists it)"
    if info.size != record.bytes:
        return f"{info.size} bytes, written as {record.bytes} (truncated or replaced)"
    if not local and info.mtime_ns != record.modified_ns:
        return "modified since it was written (replaced)"
    return None


def _content_problem(filesystem: pyarrow.fs.FileSystem, path: str, record: FileRecord) -> str | None:
    if sha256_of(filesystem, path) != record.sha256:
        return "SHA-256 differs from the one recorded when it was written (damaged)"
    try:
        with filesystem.open_input_file(path) as stream:
            rows = pq.ParquetFile(stream).metadata.num_rows
    except (OSError, pa.ArrowException) as error:
        return f"not a readable Parquet file ({error})"
    return None if rows == record.rows else f"holds {rows} rows, written with {record.rows}"


def sha256_of(filesystem: pyarrow.fs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _rebuild(location: str) -> str:
    return f"the expert-output cache is damaged: delete {location} and the next run builds it again"


def read_cache_split(cache: ExpertOutputCache, split: str, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """A whole split of the cache in memory, once its files check out: ``tensor_columns`` as torch tensors (and
    ``sample_id`` as a list of str when in ``columns``), rows in the dataset's order."""
    verify_cache_split(cache, split)
    selected = list(columns) if columns is not None else cache.tensor_columns
    filesystem, _ = filesystem_of(cache.location)
    table = pa.concat_tables([pq.read_table(filesystem_of(file)[1], columns=selected, filesystem=filesystem)
                              for file in cache.files(split)])
    return {name: arrow_to_torch(table.column(name)) for name in selected}


def cache_ray_dataset(cache: ExpertOutputCache, split: str, columns: Sequence[str] | None = None):
    """A split of the cache as a Ray dataset (``tensor_columns`` by default, in the dataset's order), once its
    files check out; ``iter_torch_batches`` yields the keys ``split_cached_batch`` takes apart."""
    from dynmm.data.readers import read_parquet_files

    verify_cache_split(cache, split)
    files = cache.files(split)
    dataset = read_parquet_files(files, list(columns) if columns is not None else cache.tensor_columns, len(files))
    dataset.context.execution_options.preserve_order = True
    return dataset


def split_cached_batch(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], FrozenOutputs]:
    """A batch of the cache (``label`` already taken out) as ``ModalityDynMM.forward_cached``'s arguments: the
    gate's raw modalities and the frozen outputs."""
    gate_inputs = {name: values for name, values in batch.items() if name not in (EXPERT_OUTPUTS, GATE_FEATURES)}
    return gate_inputs, FrozenOutputs(batch[EXPERT_OUTPUTS], batch.get(GATE_FEATURES))
