"""The datasets a training run reads: which splits, disjoint expert and gate rows, in memory or streamed.

Datasets smaller than ``MATERIALIZE_BELOW_BYTES`` are read once into Ray's object store, and every worker keeps
its own share of them (``batches.rank_share``); larger ones stream from the Parquet files every epoch, split
among the workers by Ray Train (``StreamedSplits``). A one-worker run of a small dataset reads it with the plain
reader into its own process instead (``local_datasets``: no Ray Data), once per process.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import ray
import ray.train
import torch

from dynmm.data.format import SAMPLE_ID
from dynmm.data.readers import load_split, ray_dataset
from dynmm.train.batches import LocalSplit
from dynmm.train.prepare import PreparedPipeline, holdout_fraction

if TYPE_CHECKING:
    from dynmm.train.cache_format import ExpertOutputCache


def build_datasets(
    prepared: PreparedPipeline, stage_names: Sequence[str], expert_cache: ExpertOutputCache | None = None
) -> dict[str, ray.data.Dataset]:
    """``train_experts`` / ``train_gate``: the train split, disjoint when the gate trains on a holdout;
    only those the stages read are built. With an ``expert_cache`` (a gate stage over frozen experts) the gate
    reads the cache's rows instead: the frozen outputs, labels and the raw modalities the gate itself reads.

    Datasets smaller than ``MATERIALIZE_BELOW_BYTES`` are read once into Ray's object store, so an epoch
    does not re-read Parquet, and every worker takes its share of them itself (``keeps_data_in_memory``);
    larger ones stream from the files every epoch, split among the workers by Ray Train."""
    if expert_cache is not None:
        return _cached_gate_datasets(prepared, expert_cache)
    holdout = holdout_fraction(prepared.spec)
    valid = ray_dataset(prepared.dataset_dir, "valid")
    if holdout == 0:
        train = ray_dataset(prepared.dataset_dir, "train")
        datasets = {"train_experts": train, "train_gate": train, "valid": valid}
    else:
        columns = [*prepared.meta.tensor_columns, "sample_id"]
        train = ray_dataset(prepared.dataset_dir, "train", columns=columns)
        datasets = {
            "train_experts": train.map_batches(_holdout_filter(holdout, keep_holdout=False), batch_format="pyarrow"),
            "train_gate": train.map_batches(_holdout_filter(holdout, keep_holdout=True), batch_format="pyarrow"),
            "valid": valid,
        }
    needed = {"valid"} | {"train_experts" if name == "experts" else "train_gate" for name in stage_names}
    datasets = {name: dataset for name, dataset in datasets.items() if name in needed}
    return _materialized(datasets) if keeps_data_in_memory(prepared) else datasets


def _cached_gate_datasets(prepared: PreparedPipeline, cache: ExpertOutputCache) -> dict[str, ray.data.Dataset]:
    from dynmm.train.cache_format import cache_ray_dataset

    holdout = holdout_fraction(prepared.spec)
    if holdout == 0:
        train = cache_ray_dataset(cache, "train")
    else:
        train = cache_ray_dataset(cache, "train", columns=[*cache.tensor_columns, "sample_id"]).map_batches(
            _holdout_filter(holdout, keep_holdout=True), batch_format="pyarrow")
    datasets = {"train_gate": train, "valid": cache_ray_dataset(cache, "valid")}
    return _materialized(datasets) if cache_in_memory(cache) else datasets


def local_datasets(prepared: PreparedPipeline, stage_names: Sequence[str],
                   expert_cache: ExpertOutputCache | None = None) -> dict[str, LocalSplit]:
    """``build_datasets``' splits for a one-worker run of a small dataset, read with the plain reader into this
    process: the same rows in the same order, no Ray Data. Read once per process (a Tune trial's process that
    trains trial after trial keeps them)."""
    names = tuple(sorted({"valid"} | {"train_experts" if name == "experts" else "train_gate" for name in stage_names}))
    cache_folder = expert_cache.location if expert_cache is not None else None
    return _read_locally(str(prepared.dataset_dir), cache_folder, holdout_fraction(prepared.spec), names)


@functools.lru_cache(maxsize=4)
def _read_locally(dataset_dir: str, cache_folder: str | None, holdout: float, names: tuple[str, ...]
                  ) -> dict[str, LocalSplit]:
    from dynmm.train.cache_format import open_expert_cache, read_cache_split

    cache = open_expert_cache(cache_folder) if cache_folder else None

    def read(split: str) -> dict:
        if cache is None:
            return load_split(dataset_dir, split)
        return read_cache_split(cache, split, [*cache.tensor_columns, SAMPLE_ID])

    train, splits = read("train"), {"valid": _tensors(read("valid"))}
    for name in names:
        if name != "valid":
            keep_holdout = name == "train_gate"
            rows = [index for index, sample in enumerate(train[SAMPLE_ID])
                    if holdout == 0 or in_gate_holdout(sample, holdout) == keep_holdout]
            splits[name] = _tensors(train, torch.tensor(rows, dtype=torch.long))
    return {name: LocalSplit(splits[name]) for name in names}


def _tensors(split: dict, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return {name: (values if rows is None else values[rows]) for name, values in split.items() if name != SAMPLE_ID}


def _materialized(datasets: dict[str, ray.data.Dataset]) -> dict[str, ray.data.Dataset]:
    datasets = {name: dataset.materialize() for name, dataset in datasets.items()}
    for dataset in datasets.values():
        dataset.context.execution_options.preserve_order = True  # every rank slices the same order
    return datasets


class StreamedSplits(ray.train.DataConfig):
    """How Ray Train splits streamed (large) datasets among the workers: the training sets in equal shares
    (``equal=True`` leaves out up to world_size - 1 rows, so every rank runs the same number of DDP steps),
    the validation set in shares that keep every row (validation runs no collective per batch, and its
    summed metrics are those of the whole split)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        training = {name: dataset for name, dataset in datasets.items() if name != "valid"}
        shards = super().configure(training, world_size, worker_handles, worker_node_ids, **kwargs)
        if "valid" in datasets:
            valid = datasets["valid"].copy(datasets["valid"])
            valid.context.execution_options = self._resolve_execution_options("valid")
            for shard, split in zip(shards, valid.streaming_split(world_size, equal=False), strict=True):
                shard["valid"] = split
        return shards


def keeps_data_in_memory(prepared: PreparedPipeline) -> bool:
    return _folder_bytes(prepared.dataset_dir) < MATERIALIZE_BELOW_BYTES


def cache_in_memory(cache: ExpertOutputCache) -> bool:
    """The expert-output cache is kept in memory on the same terms as a dataset (it is usually far smaller); its
    size is the one its manifest recorded, wherever it lies."""
    return cache.total_bytes < MATERIALIZE_BELOW_BYTES


MATERIALIZE_BELOW_BYTES = 256 * 2**20


def _folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*.parquet"))


def in_gate_holdout(sample_id: str, fraction: float) -> bool:
    """Whether a train row belongs to the gate's holdout: a stable hash of its sample id, the same rows in
    every run."""
    return zlib.crc32(sample_id.encode()) % 10_000 < int(fraction * 10_000)


def _holdout_filter(fraction: float, keep_holdout: bool) -> Callable[[pa.Table], pa.Table]:
    def select(table: pa.Table) -> pa.Table:
        keep = [in_gate_holdout(sample, fraction) == keep_holdout for sample in table["sample_id"].to_pylist()]
        return table.filter(pa.array(keep)).drop_columns(["sample_id"])

    return select
