"""Building the expert-output cache: what the frozen experts compute for every sample, computed once per split and
kept as Parquet beside the trained experts (a local or shared folder, or object storage), so that every gate-stage
trial (and every later study on the same experts) trains its gate without running them. It only speeds up
training: evaluation, registered models and serving run the real routed model.

The key hashes the experts' weights file, the dataset's version (its files' SHA-256) and the model: a cache of
other experts or another dataset version is never read, a new one is built (and said so) and the stale one
removed. One Ray Data pass writes every split into a build folder of its own; the manifest naming it is written
last (``dynmm.train.cache_format`` has the layout and the readers). Its tasks hand each batch to actors holding
the experts (in evaluation mode, on GPUs when asked); nothing here depends on the training loop.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import ray
import torch

from dynmm.data.format import LABEL, SAMPLE_ID, DatasetMeta, file_sha256, split_files
from dynmm.data.readers import arrow_to_torch
from dynmm.errors import UserError
from dynmm.models import ModelRecipe
from dynmm.train.cache_format import (
    CACHE_FORMAT_VERSION,
    EXPERT_OUTPUTS,
    GATE_FEATURES,
    MANIFEST_FILE,
    SPLIT,
    CachedFile,
    CacheManifest,
    ExpertOutputCache,
    cache_root,
    has_manifest,
    open_expert_cache,
    sha256_of,
    verify_cache_split,
)
from dynmm.train.checkpoints import EXPERTS_FILE, read_experts
from dynmm.train.job import stable_hash
from dynmm.train.store import delete_if_present, filesystem_of, join, put_whole

GATE_STAGE_SPLITS = ("train", "valid")  # what gate training and validation read; test runs the real model
CACHE_TASK_CPUS = 0.1  # CPUs each read, tag and write task of the build asks for (see _write_frozen_outputs)


@dataclass(frozen=True)
class CacheSource:
    """What a cache is computed from: a dataset (its folder and metadata) and the model whose trained experts lie
    at ``experts_uri`` (a local path or a URI)."""

    dataset_dir: str | Path
    meta: DatasetMeta
    model: ModelRecipe
    experts_uri: str

    @property
    def actor_args(self) -> tuple[dict, str]:
        """What an experts' actor is built from (plain values: the recipe as JSON, the experts' URI)."""
        return self.model.to_json(), self.experts_uri


@dataclass(frozen=True)
class ActorOptions:
    """The experts' actors of a build: ``concurrency`` actors of ``cpus_per_actor`` CPUs (and ``gpus_per_actor``
    GPUs each when ``use_gpu``), each handed batches of ``batch_size`` rows."""

    use_gpu: bool = False
    concurrency: int = 1
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    batch_size: int = 1024
    in_process: bool = False  # no actors and no Ray Data pass: the rows computed here (a small dataset)


def _say_on_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def ensure_expert_cache(
    source: CacheSource,
    splits: Sequence[str] = GATE_STAGE_SPLITS,
    options: ActorOptions = ActorOptions(),
    say: Callable[[str], None] = _say_on_stderr,
) -> ExpertOutputCache:
    """The cache of ``source``'s experts over ``splits`` of its dataset: reused when it was built from these
    experts, this dataset version and this model (its files verified), else built now on the Ray this process is
    connected to (leave CPUs to Ray Data's read and write tasks beside the actors, or the pass waits on itself).
    ``say`` gets one line when a cache is built, saying why."""
    identity = cache_identity(source)
    root = cache_root(source.experts_uri)
    target = join(root, stable_hash(identity))
    if has_manifest(target):
        cache = open_expert_cache(target)
        missing = [split for split in splits if split not in cache.splits]
        if not missing:
            for split in splits:
                verify_cache_split(cache, split)
            return cache
        say(f"expert-output cache {target}: lacks split(s) {', '.join(missing)}; building it again with them")
        splits = [*cache.splits, *missing]
    stale = [key for key in _folders(root) if key != target]
    for key in stale:
        say(f"expert-output cache {key}: stale (the experts or the dataset changed since it was built), not used; "
            f"building {target.rsplit('/', 1)[-1]} instead")
    started = time.perf_counter()
    _build(target, identity, source, splits, options)
    filesystem, _ = filesystem_of(root)
    for key in stale:
        delete_if_present(filesystem, filesystem_of(key)[1])
    say(f"expert-output cache {target}: built for split(s) {', '.join(splits)} in "
        f"{time.perf_counter() - started:.1f} s")
    return open_expert_cache(target)


def cache_identity(source: CacheSource) -> dict[str, Any]:
    """What a cache's contents are a function of: the experts' weights file (SHA-256 of its bytes), the dataset's
    version (its files' SHA-256: recorded in dataset.json, or computed for a dataset written without records),
    the model (name, arguments and a user's builder code), and whether the gate has frozen features."""
    dataset_files = {name: record.sha256 for name, record in sorted(source.meta.files.items())}
    if not dataset_files:
        dataset_files = {f"{split}/{file.name}": file_sha256(file) for split in source.meta.splits
                         for file in split_files(source.dataset_dir, split)}
    built = source.model.build()
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "experts_sha256": _experts_sha256(source.experts_uri),
        "dataset_files": dataset_files,
        "model_name": source.model.name,
        "model_args": json.loads(json.dumps(source.model.args, sort_keys=True, default=str)),
        **({"model_code_sha256": source.model.digest} if source.model.digest else {}),
        "gate_features": getattr(built.gate, "source_expert", None) is not None,
    }


def _experts_sha256(experts_uri: str) -> str:
    filesystem, root = filesystem_of(experts_uri)
    path = f"{root}/{EXPERTS_FILE}"
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        raise UserError(f"{experts_uri}: no trained experts ({EXPERTS_FILE}); run the experts stage first")
    return sha256_of(filesystem, path)


def _folders(location: str) -> list[str]:
    """The folders directly under ``location`` (none where it does not exist), as locations."""
    filesystem, root = filesystem_of(location)
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    return sorted(join(location, info.base_name) for info in infos if info.type == pyarrow.fs.FileType.Directory)


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


def _build(target: str, identity: dict, source: CacheSource, splits: Sequence[str], options: ActorOptions) -> None:
    """Compute every split into a build folder of its own under ``target``, record its files, then write the
    manifest that names it (last) and delete the builds it replaces."""
    if not options.in_process and not ray.is_initialized():
        raise RuntimeError("building the expert-output cache needs a connected Ray (dynmm.runtime.connect_ray)")
    build = f"build-{uuid.uuid4().hex[:12]}"
    filesystem, root = filesystem_of(target)
    try:
        write = _write_frozen_outputs_here if options.in_process else _write_frozen_outputs
        write(join(target, build), source, splits, options)
        records = {split: _recorded_in_row_order(join(target, build, f"{SPLIT}={split}"), source, split)
                   for split in splits}
    except BaseException:
        delete_if_present(filesystem, f"{root}/{build}")
        raise
    manifest = CacheManifest(format_version=CACHE_FORMAT_VERSION, identity=identity, build=build, splits=records,
                             gate_modalities=source.model.build().gate_input_modalities)
    put_whole(filesystem, f"{root}/{MANIFEST_FILE}", (manifest.model_dump_json(indent=1) + "\n").encode())
    # the builds this one replaces (an older one of the same key; one a killed build left half-written)
    for folder in _folders(target):
        if not folder.endswith(f"/{build}"):
            delete_if_present(filesystem, filesystem_of(folder)[1])


def _write_frozen_outputs(folder: str, source: CacheSource, splits: Sequence[str], options: ActorOptions) -> None:
    """One distributed pass over every split (one pool of actors, each loading the experts once): rows of split
    ``s`` land in ``folder/split=s/``, named by write task."""
    from dynmm.data.readers import ray_dataset

    columns = [*source.meta.modalities, LABEL, SAMPLE_ID]
    # Reading, tagging and writing ask for a small share of a CPU, not Ray's default whole one: on a cluster whose
    # CPUs are partly held by fractional Ray Train workers (or by a placement group a killed driver left behind)
    # the experts' actor gets its share and then tasks that each want a whole CPU would wait for ever.
    tagged = [ray_dataset(source.dataset_dir, split, columns=columns, task_cpus=CACHE_TASK_CPUS).map_batches(
        _tag_split, fn_kwargs={"split": split}, batch_format="pyarrow", num_cpus=CACHE_TASK_CPUS) for split in splits]
    rows = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]
    rows.context.execution_options.preserve_order = True
    experts = _start_expert_actors(source.actor_args, options)
    try:
        rows.map_batches(_frozen_outputs_from, fn_kwargs={"experts": experts}, batch_format="pyarrow",
                         batch_size=options.batch_size, num_cpus=CACHE_TASK_CPUS).write_parquet(
            folder, partition_cols=[SPLIT], filename_provider=_TaskOrderNames(), compression="lz4",
            ray_remote_args={"num_cpus": CACHE_TASK_CPUS})
    finally:
        for actor in experts:
            ray.kill(actor)


def _write_frozen_outputs_here(folder: str, source: CacheSource, splits: Sequence[str], options: ActorOptions) -> None:
    """The rows ``_write_frozen_outputs`` writes, computed in this process by the same code, one file per split: for
    a dataset small enough to keep in memory, where starting actors and a Ray Data pass cost seconds for a pass
    that takes a fraction of one."""
    frozen = _FrozenOutputsOfRows(*source.actor_args, options.use_gpu)
    filesystem, root = filesystem_of(folder)
    columns = [*source.meta.modalities, LABEL, SAMPLE_ID]
    for split in splits:
        files = split_files(source.dataset_dir, split)
        table = pa.concat_tables([pq.read_table(file, columns=columns) for file in files])
        rows = [frozen(_tag_split(table.slice(start, options.batch_size), split)).drop_columns([SPLIT])
                for start in range(0, table.num_rows, options.batch_size)]
        filesystem.create_dir(f"{root}/{SPLIT}={split}", recursive=True)
        with filesystem.open_output_stream(f"{root}/{SPLIT}={split}/part-000000-here-0.parquet") as stream:
            pq.write_table(pa.concat_tables(rows), stream, compression="lz4")


def _start_expert_actors(model: tuple[dict, str], options: ActorOptions) -> list:
    """The experts' actors. Not Ray Data's actor pool: it gives its actors Ray Data's state through the object store,
    where Ray cannot promise a restart (ray-project/ray#53727, logged at error level); these take inline arguments."""
    actor = ray.remote(_FrozenOutputsOfRows).options(
        num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor if options.use_gpu else 0,
        max_restarts=-1, max_task_retries=-1)
    return [actor.remote(*model, options.use_gpu) for _ in range(options.concurrency)]


def _frozen_outputs_from(table: pa.Table, experts: list) -> pa.Table:
    """A Ray Data task's batch, computed by one of the experts' actors (any: they hold the same model)."""
    return ray.get(random.choice(experts).__call__.remote(table))


def _tag_split(table: pa.Table, split: str) -> pa.Table:
    return table.append_column(SPLIT, pa.array([split] * table.num_rows, pa.string()))


def _recorded_in_row_order(folder: str, source: CacheSource, split: str) -> dict[str, CachedFile]:
    """One split's written files in row order (write-task order), each recorded as its filesystem lists it now;
    the rows checked against the dataset's order."""
    filesystem, path = filesystem_of(folder)
    infos = [info for info in filesystem.get_file_info(pyarrow.fs.FileSelector(path))
             if info.type == pyarrow.fs.FileType.File]
    records = {}
    for info in sorted(infos, key=lambda info: _task_and_file_index(info.base_name)):
        with filesystem.open_input_file(info.path) as stream:
            rows = pq.ParquetFile(stream).metadata.num_rows
        records[info.base_name] = CachedFile(rows=rows, bytes=info.size, sha256=sha256_of(filesystem, info.path),
                                             modified_ns=info.mtime_ns or 0)
    _check_row_order(filesystem, [f"{path}/{name}" for name in records], source, split)
    return records


class _TaskOrderNames:
    """File names by write-task index (Ray's ``FilenameProvider`` protocol): with the dataset's order preserved,
    task order is row order."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:06d}-{write_uuid}"


def _task_and_file_index(name: str) -> tuple[int, int]:
    match = re.fullmatch(r"part-(\d+)-.*-(\d+)\.parquet", name)
    if match is None:
        raise RuntimeError(f"{name}: not a file name the cache's writer gives")
    return int(match[1]), int(match[2])


def _check_row_order(filesystem: pyarrow.fs.FileSystem, paths: list[str], source: CacheSource, split: str) -> None:
    """The cache holds the split's rows in the dataset's order, so a run over it visits the rows (and shuffles
    them) as a run over the dataset does."""
    cached = [sample for path in paths for sample in
              pq.read_table(path, columns=[SAMPLE_ID], filesystem=filesystem)[SAMPLE_ID].to_pylist()]
    source_rows = [sample for file in split_files(source.dataset_dir, split)
                   for sample in pq.read_table(file, columns=[SAMPLE_ID])[SAMPLE_ID].to_pylist()]
    if cached != source_rows:
        raise RuntimeError(f"{paths[0].rsplit('/', 1)[0]}: the expert-output cache's rows are not in the dataset's "
                           "order")


def _tensor_array(values: torch.Tensor) -> pa.FixedShapeTensorArray:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values.detach().float().cpu().numpy()))
