"""The expert-output cache: what the frozen experts compute for every sample, computed once per split and kept
as Parquet beside the trained experts, so that every gate-stage trial (and every later study on the same
experts) trains its gate without running them. It only speeds up training: evaluation, registered models and
serving run the real routed model.

Layout, under the experts' folder (``experts_uri``, a local or shared folder)::

    output-cache/<key>/manifest.json               identity, gate modalities, a FileRecord per file
    output-cache/<key>/<split>/part-NNNNN.parquet  rows in the dataset's order

Columns: ``sample_id``, ``label`` and the raw modalities the gate reads, as in the dataset; ``expert_outputs``
(P, *out) and, for a gate over an expert's confidence, ``gate_features`` (F,), both float32
``fixed_shape_tensor``. The key hashes the experts' weights file, the dataset's version (its files' SHA-256)
and the model: a cache of other experts or another dataset version is never read, a new one is built (and
said so) and the stale one removed. Every file is checked against the manifest before it is read; a damaged
one is a ``DatasetError`` naming it. Built by one Ray Data pass whose tasks hand each batch to actors holding the
experts (in evaluation mode, on GPUs when asked); nothing here depends on the training loop.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from dynmm.data.format import LABEL, SAMPLE_ID, DatasetMeta, FileRecord, file_sha256, split_files
from dynmm.data.readers import arrow_to_torch
from dynmm.errors import DatasetError, UserError
from dynmm.files import write_text_atomically
from dynmm.models import ModelRecipe
from dynmm.models.dynmm import FrozenOutputs
from dynmm.train.checkpoints import EXPERTS_FILE, read_experts
from dynmm.train.job import stable_hash

CACHE_FOLDER = "output-cache"
MANIFEST_FILE = "manifest.json"
EXPERT_OUTPUTS = "expert_outputs"
GATE_FEATURES = "gate_features"
CACHE_FORMAT_VERSION = 1
SPLIT = "split"  # the column that carries each row's split through the build, written as the folder name
GATE_STAGE_SPLITS = ("train", "valid")  # what gate training and validation read; test runs the real model
CACHE_TASK_CPUS = 0.1  # CPUs each read, tag and write task of the build asks for (see _write_frozen_outputs)


class CacheManifest(BaseModel):
    """What ``manifest.json`` records: what the cache was computed from and every file it holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int
    identity: dict[str, Any]
    gate_modalities: tuple[str, ...]
    splits: dict[str, dict[str, FileRecord]]  # split -> file name -> record, in row order


@dataclass(frozen=True)
class ExpertOutputCache:
    """A built cache: its folder and manifest. Read it with ``read_cache_split`` or ``cache_ray_dataset``."""

    directory: Path
    manifest: CacheManifest

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest.splits)

    @property
    def tensor_columns(self) -> list[str]:
        """The columns that become torch tensors: the gate's raw modalities, ``label``, the frozen outputs."""
        frozen = [EXPERT_OUTPUTS, *([GATE_FEATURES] if self.manifest.identity["gate_features"] else [])]
        return [*self.manifest.gate_modalities, LABEL, *frozen]

    def files(self, split: str) -> list[Path]:
        if split not in self.manifest.splits:
            raise DatasetError(f"{self.directory}: the expert-output cache has no split {split!r} "
                               f"(it has {', '.join(self.splits)})")
        return [self.directory / split / name for name in self.manifest.splits[split]]


def ensure_expert_cache(
    dataset_dir: str | Path,
    meta: DatasetMeta,
    model: ModelRecipe,
    experts_uri: str,
    splits: Sequence[str] = GATE_STAGE_SPLITS,
    *,
    use_gpu: bool = False,
    concurrency: int = 1,
    gpus_per_actor: float = 1.0,
    cpus_per_actor: float = 1.0,
    batch_size: int = 1024,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> ExpertOutputCache:
    """The cache of the experts at ``experts_uri`` over ``splits`` of the dataset: reused when it was built from
    these experts, this dataset version and this model (its files verified), else built now on the Ray this
    process is connected to (``concurrency`` actors of ``cpus_per_actor`` CPUs, and ``gpus_per_actor`` GPUs each when
    ``use_gpu``; leave CPUs to Ray Data's read and write tasks, or the pass waits on itself). ``say``
    gets one line when a cache is built, saying why."""
    identity = cache_identity(dataset_dir, meta, model, experts_uri)
    root = cache_root(experts_uri)
    target = root / stable_hash(identity)
    if (target / MANIFEST_FILE).is_file():
        cache = open_expert_cache(target)
        missing = [split for split in splits if split not in cache.splits]
        if not missing:
            for split in splits:
                verify_cache_split(cache, split)
            return cache
        say(f"expert-output cache {target}: lacks split(s) {', '.join(missing)}; building it again with them")
        splits = [*cache.splits, *missing]
    stale = [entry for entry in sorted(root.glob("*")) if entry.is_dir() and not entry.name.startswith(".")
             and entry != target]
    for entry in stale:
        say(f"expert-output cache {entry}: stale (the experts or the dataset changed since it was built), not used; "
            f"building {target.name} instead")
    started = time.perf_counter()
    _build(target, identity, dataset_dir, meta, model, experts_uri, splits,
           _ActorOptions(use_gpu, concurrency, gpus_per_actor, batch_size, cpus_per_actor))
    for entry in stale:
        shutil.rmtree(entry, ignore_errors=True)
    say(f"expert-output cache {target}: built for split(s) {', '.join(splits)} in "
        f"{time.perf_counter() - started:.1f} s")
    return open_expert_cache(target)


def cache_identity(dataset_dir: str | Path, meta: DatasetMeta, model: ModelRecipe, experts_uri: str) -> dict[str, Any]:
    """What a cache's contents are a function of: the experts' weights file (SHA-256 of its bytes), the dataset's
    version (its files' SHA-256: recorded in dataset.json, or computed for a dataset written without records),
    the model (name, arguments and a user's builder code), and whether the gate has frozen features."""
    dataset_files = {name: record.sha256 for name, record in sorted(meta.files.items())}
    if not dataset_files:
        dataset_files = {f"{split}/{file.name}": file_sha256(file) for split in meta.splits
                         for file in split_files(dataset_dir, split)}
    built = model.build()
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "experts_sha256": _experts_sha256(experts_uri),
        "dataset_files": dataset_files,
        "model_name": model.name,
        "model_args": json.loads(json.dumps(model.args, sort_keys=True, default=str)),
        **({"model_code_sha256": model.digest} if model.digest else {}),
        "gate_features": getattr(built.gate, "source_expert", None) is not None,
    }


def cache_root(experts_uri: str) -> Path:
    """``<experts_uri>/output-cache`` as a local path (the cache is written with renames, which object stores
    do not have)."""
    if "://" in experts_uri and not experts_uri.startswith("file://"):
        raise UserError(f"{experts_uri}: the expert-output cache needs the run storage (run.storage_path) on a "
                        "local or shared folder, not object storage")
    return Path(experts_uri.removeprefix("file://")) / CACHE_FOLDER


def _experts_sha256(experts_uri: str) -> str:
    path = cache_root(experts_uri).parent / EXPERTS_FILE
    if not path.is_file():
        raise UserError(f"{experts_uri}: no trained experts ({EXPERTS_FILE}); run the experts stage first")
    return file_sha256(path)


@dataclass(frozen=True)
class _ActorOptions:
    use_gpu: bool
    concurrency: int
    gpus_per_actor: float
    batch_size: int
    cpus_per_actor: float = 1.0


class _FrozenOutputsOfRows:
    """A Ray actor holding the model with its trained experts (read from their storage) frozen, in evaluation mode
    (as at inference and in the gate stage): turns a batch of dataset rows into the cache's rows."""

    def __init__(self, model: dict, experts_uri: str, use_gpu: bool) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model = ModelRecipe.from_json(model).build()
        model.experts.load_state_dict(read_experts(experts_uri))
        self.model = model.freeze_experts().eval().to(self.device)

    def __call__(self, table: pa.Table) -> pa.Table:
        inputs = {name: arrow_to_torch(table.column(name)).to(self.device) for name in self.model.input_shapes}
        frozen = self.model.frozen_outputs(inputs)
        kept = (SPLIT, SAMPLE_ID, LABEL, *self.model.gate_input_modalities)
        columns = {name: table.column(name) for name in kept}
        columns[EXPERT_OUTPUTS] = _tensor_array(frozen.expert_outputs)
        if frozen.gate_features is not None:
            columns[GATE_FEATURES] = _tensor_array(frozen.gate_features)
        return pa.table(columns)


def _build(target: Path, identity: dict, dataset_dir: str | Path, meta: DatasetMeta, model: ModelRecipe,
           experts_uri: str, splits: Sequence[str], options: _ActorOptions) -> None:
    """Compute every split into a staging folder beside ``target``, then move it into place whole."""
    if not ray.is_initialized():
        raise RuntimeError("building the expert-output cache needs a connected Ray (dynmm.runtime.connect_ray)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_frozen_outputs(staging / ".written", dataset_dir, meta, splits, (model, experts_uri), options)
        records = {split: _name_in_row_order(staging / ".written" / f"{SPLIT}={split}", staging / split,
                                             dataset_dir, split) for split in splits}
        manifest = CacheManifest(format_version=CACHE_FORMAT_VERSION, identity=identity, splits=records,
                                 gate_modalities=model.build().gate_input_modalities)
        write_text_atomically(staging / MANIFEST_FILE, manifest.model_dump_json(indent=1) + "\n")
        shutil.rmtree(staging / ".written")
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_frozen_outputs(folder: Path, dataset_dir: str | Path, meta: DatasetMeta, splits: Sequence[str],
                          model: tuple, options: _ActorOptions) -> None:
    """One distributed pass over every split (one pool of actors, each loading the experts once): rows of split
    ``s`` land in ``folder/split=s/``, named by write task."""
    from dynmm.data.readers import ray_dataset

    columns = [*meta.modalities, LABEL, SAMPLE_ID]
    # Reading, tagging and writing ask for a small share of a CPU, not Ray's default whole one: on a cluster whose
    # CPUs are partly held by fractional Ray Train workers (or by a placement group a killed driver left behind)
    # the experts' actor gets its share and then tasks that each want a whole CPU would wait for ever.
    tagged = [ray_dataset(dataset_dir, split, columns=columns, task_cpus=CACHE_TASK_CPUS).map_batches(
        _tag_split, fn_kwargs={"split": split}, batch_format="pyarrow", num_cpus=CACHE_TASK_CPUS) for split in splits]
    rows = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]
    rows.context.execution_options.preserve_order = True
    experts = _start_expert_actors(model, options)
    try:
        rows.map_batches(_frozen_outputs_from, fn_kwargs={"experts": experts}, batch_format="pyarrow",
                         batch_size=options.batch_size, num_cpus=CACHE_TASK_CPUS).write_parquet(
            str(folder), partition_cols=[SPLIT], filename_provider=_TaskOrderNames(), compression="lz4",
            ray_remote_args={"num_cpus": CACHE_TASK_CPUS})
    finally:
        for actor in experts:
            ray.kill(actor)


def _start_expert_actors(model: tuple, options: _ActorOptions) -> list:
    """The experts' actors. Not Ray Data's actor pool: it gives its actors Ray Data's state through the object store,
    where Ray cannot promise a restart (ray-project/ray#53727, logged at error level); these take inline arguments."""
    actor = ray.remote(_FrozenOutputsOfRows).options(
        num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor if options.use_gpu else 0,
        max_restarts=-1, max_task_retries=-1)
    recipe, experts_uri = model
    return [actor.remote(recipe.to_json(), experts_uri, options.use_gpu) for _ in range(options.concurrency)]


def _frozen_outputs_from(table: pa.Table, experts: list) -> pa.Table:
    """A Ray Data task's batch, computed by one of the experts' actors (any: they hold the same model)."""
    return ray.get(random.choice(experts).__call__.remote(table))


def _tag_split(table: pa.Table, split: str) -> pa.Table:
    return table.append_column(SPLIT, pa.array([split] * table.num_rows, pa.string()))


def _name_in_row_order(written: Path, folder: Path, dataset_dir: str | Path, split: str) -> dict[str, FileRecord]:
    """Move one split's written files to ``folder/part-NNNNN.parquet`` in row order and record each."""
    folder.mkdir()
    records = {}
    for index, file in enumerate(sorted(written.glob("part-*.parquet"), key=_task_and_file_index)):
        path = file.rename(folder / f"part-{index:05d}.parquet")
        records[path.name] = FileRecord(rows=pq.ParquetFile(path).metadata.num_rows, bytes=path.stat().st_size,
                                        sha256=file_sha256(path))
    _check_row_order(folder, list(records), dataset_dir, split)
    return records


class _TaskOrderNames:
    """File names by write-task index (Ray's ``FilenameProvider`` protocol): with the dataset's order preserved,
    task order is row order."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:06d}-{write_uuid}"


def _task_and_file_index(file: Path) -> tuple[int, int]:
    match = re.fullmatch(r"part-(\d+)-.*-(\d+)\.parquet", file.name)
    if match is None:
        raise RuntimeError(f"{file}: not a file name the cache's writer gives")
    return int(match[1]), int(match[2])


def _check_row_order(folder: Path, names: list[str], dataset_dir: str | Path, split: str) -> None:
    """The cache holds the split's rows in the dataset's order, so a run over it visits the rows (and shuffles
    them) as a run over the dataset does."""
    cached = [sample for name in names for sample in pq.read_table(folder / name, columns=[SAMPLE_ID])[SAMPLE_ID]
              .to_pylist()]
    source = [sample for file in split_files(dataset_dir, split)
              for sample in pq.read_table(file, columns=[SAMPLE_ID])[SAMPLE_ID].to_pylist()]
    if cached != source:
        raise RuntimeError(f"{folder}: the expert-output cache's rows are not in the dataset's order")


def _move_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` (an older or concurrent build of the same key) by ``staging`` with renames only."""
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.rename(target, retired)
    os.rename(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def _tensor_array(values: torch.Tensor) -> pa.FixedShapeTensorArray:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values.detach().float().cpu().numpy()))


def open_expert_cache(directory: str | Path) -> ExpertOutputCache:
    """The cache in ``directory`` with its manifest; a missing or malformed manifest is a ``DatasetError``."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    try:
        manifest = CacheManifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found; {directory} is not an expert-output cache") from None
    except (OSError, ValidationError) as error:
        problem = str(error).splitlines()[0][:200]
        raise DatasetError(f"{path}: damaged expert-output cache manifest ({problem}); {_rebuild(directory)}") from None
    if manifest.format_version != CACHE_FORMAT_VERSION:
        raise DatasetError(f"{path}: cache format {manifest.format_version}, expected {CACHE_FORMAT_VERSION}; "
                           f"{_rebuild(directory)}")
    return ExpertOutputCache(directory, manifest)


def verify_cache_split(cache: ExpertOutputCache, split: str) -> None:
    """Every file of ``split`` is the one written (size, SHA-256, Parquet footer, rows) and no other is there:
    a damaged cache is a ``DatasetError`` naming the file, never a wrong result."""
    expected = cache.files(split)
    extra = sorted(set((cache.directory / split).glob("part-*.parquet")) - set(expected))
    if extra:
        raise DatasetError(f"{extra[0]}: not part of the expert-output cache (its manifest does not list it); "
                           f"{_rebuild(cache.directory)}")
    for file in expected:
        record = cache.manifest.splits[split][file.name]
        problem = _file_problem(file, record)
        if problem:
            raise DatasetError(f"{file}: {problem}; {_rebuild(cache.directory)}")


def _file_problem(file: Path, record: FileRecord) -> str | None:
    if not file.is_file():
        return "missing (the cache's manifest lists it)"
    if file.stat().st_size != record.bytes:
        return f"{file.stat().st_size} bytes, written as {record.bytes} (truncated or replaced)"
    if file_sha256(file) != record.sha256:
        return "SHA-256 differs from the one recorded when it was written (damaged)"
    try:
        rows = pq.ParquetFile(file).metadata.num_rows
    except (OSError, pa.ArrowException) as error:
        return f"not a readable Parquet file ({error})"
    return None if rows == record.rows else f"holds {rows} rows, written with {record.rows}"


def _rebuild(directory: Path) -> str:
    return f"the expert-output cache is damaged: delete {directory} and the next run builds it again"


def read_cache_split(cache: ExpertOutputCache, split: str, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """A whole split of the cache in memory, once its files check out: ``tensor_columns`` as torch tensors (and
    ``sample_id`` as a list of str when in ``columns``), rows in the dataset's order."""
    verify_cache_split(cache, split)
    selected = list(columns) if columns is not None else cache.tensor_columns
    table = pa.concat_tables([pq.read_table(file, columns=selected) for file in cache.files(split)])
    return {name: arrow_to_torch(table.column(name)) for name in selected}


def cache_ray_dataset(cache: ExpertOutputCache, split: str, columns: Sequence[str] | None = None):
    """A split of the cache as a Ray dataset (``tensor_columns`` by default, in the dataset's order), once its
    files check out; ``iter_torch_batches`` yields the keys ``split_cached_batch`` takes apart."""
    from dynmm.data.readers import read_parquet_files

    verify_cache_split(cache, split)
    files = [str(file) for file in cache.files(split)]
    dataset = read_parquet_files(files, list(columns) if columns is not None else cache.tensor_columns, len(files))
    dataset.context.execution_options.preserve_order = True
    return dataset


def split_cached_batch(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], FrozenOutputs]:
    """A batch of the cache (``label`` already taken out) as ``ModalityDynMM.forward_cached``'s arguments: the
    gate's raw modalities and the frozen outputs."""
    gate_inputs = {name: values for name, values in batch.items() if name not in (EXPERT_OUTPUTS, GATE_FEATURES)}
    return gate_inputs, FrozenOutputs(batch[EXPERT_OUTPUTS], batch.get(GATE_FEATURES))
