"""The expert-output cache on the built-in digits dataset: one real Ray Data build, read back equal to the experts
run directly (in evaluation mode, in the dataset's order); reused as it is, rebuilt (and said so) when the experts
changed, and a damaged file is an error that names it."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch

from dynmm.data.format import read_meta, split_files
from dynmm.data.readers import load_split, resolve_dataset
from dynmm.errors import DatasetError
from dynmm.models import ModelRecipe, build_model
from dynmm.train.cache_format import (
    MANIFEST_FILE,
    ExpertOutputCache,
    cache_ray_dataset,
    read_cache_split,
    split_cached_batch,
)
from dynmm.train.checkpoints import write_experts
from dynmm.train.expert_cache import ActorOptions, CacheSource, _start_expert_actors, _tag_split, ensure_expert_cache

pytestmark = pytest.mark.integration
MODEL_ARGS = {"gate": "confidence"}


@dataclass
class Built:
    dataset: Path
    experts_uri: Path
    model: torch.nn.Module
    cache: ExpertOutputCache
    messages: list[str]
    build_seconds: float


def _trained_looking_experts(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("digits", **MODEL_ARGS)
    with torch.no_grad():
        for parameter in model.experts.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return model


def _source(dataset: Path, experts_uri: Path) -> CacheSource:
    return CacheSource(dataset, read_meta(dataset), ModelRecipe("digits", MODEL_ARGS), str(experts_uri))


def _ensure(built: Built, experts_uri: Path, messages: list[str], splits=("train", "valid")) -> ExpertOutputCache:
    return ensure_expert_cache(_source(built.dataset, experts_uri), splits, say=messages.append)


@pytest.fixture(scope="module")
def built(ray_session, tmp_path_factory) -> Built:
    root = tmp_path_factory.mktemp("expert-cache")
    dataset = resolve_dataset("digits", root / "datasets")
    model = _trained_looking_experts(seed=0)
    experts_uri = root / "experts"
    write_experts(str(experts_uri), model.experts.state_dict(), {})
    messages: list[str] = []
    started = time.perf_counter()
    cache = ensure_expert_cache(_source(dataset, experts_uri), say=messages.append)
    return Built(dataset, experts_uri, model, cache, messages, time.perf_counter() - started)


def test_the_cache_holds_what_the_experts_compute_in_evaluation_mode_in_the_datasets_order(built):
    print(f"digits expert-output cache (train + valid) built in {built.build_seconds:.1f} s")
    assert Path(built.cache.location).parent == built.experts_uri / "output-cache"
    assert len(built.messages) == 1 and "built for split(s) train, valid" in built.messages[0]
    model = built.model.freeze_experts().eval()
    for split in ("train", "valid"):
        raw = load_split(built.dataset, split)
        expected = model.frozen_outputs({name: raw[name] for name in model.input_shapes})
        cached = read_cache_split(built.cache, split, columns=[*built.cache.tensor_columns, "sample_id"])
        assert cached["sample_id"] == raw["sample_id"] and torch.equal(cached["label"], raw["label"])
        torch.testing.assert_close(cached["expert_outputs"], expected.expert_outputs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cached["gate_features"], expected.gate_features, rtol=1e-6, atol=1e-6)
        assert cached["expert_outputs"].shape == (len(raw["label"]), 2, 10)


def test_the_ray_dataset_of_the_cache_feeds_the_cached_forward(built):
    (batch,) = cache_ray_dataset(built.cache, "valid").iter_torch_batches(batch_size=1000)
    assert set(batch) == {"label", "expert_outputs", "gate_features"}
    label = batch.pop("label")
    gate_inputs, frozen = split_cached_batch(batch)
    model = built.model.freeze_experts().eval()
    raw = load_split(built.dataset, "valid")
    routed = model.forward_cached(gate_inputs, frozen, mode="routed")
    real = model({name: raw[name] for name in model.input_shapes}, mode="routed")
    assert torch.equal(label, raw["label"]) and torch.equal(routed.paths, real.paths)
    torch.testing.assert_close(routed.output, real.output, rtol=1e-6, atol=1e-6)


def test_a_cache_of_the_same_experts_and_dataset_is_reused_without_building(built):
    messages: list[str] = []
    again = _ensure(built, built.experts_uri, messages)
    assert messages == [] and again.location == built.cache.location


def test_changed_experts_make_the_cache_stale_it_is_rebuilt_and_the_output_says_so(built, tmp_path):
    experts_uri = tmp_path / "experts"
    shutil.copytree(built.experts_uri, experts_uri)
    retrained = _trained_looking_experts(seed=1)
    write_experts(str(experts_uri), retrained.experts.state_dict(), {})
    messages: list[str] = []
    rebuilt = _ensure(built, experts_uri, messages, splits=("valid",))
    stale = experts_uri / "output-cache" / Path(built.cache.location).name
    assert Path(rebuilt.location).name != stale.name and not stale.exists()
    assert any(f"expert-output cache {stale}: stale (the experts or the dataset changed" in line for line in messages)
    raw = load_split(built.dataset, "valid")
    expected = retrained.freeze_experts().eval().frozen_outputs({name: raw[name] for name in ("top", "bottom")})
    torch.testing.assert_close(read_cache_split(rebuilt, "valid")["expert_outputs"], expected.expert_outputs)


def test_a_damaged_cache_file_is_an_error_naming_it_not_a_wrong_result(built, tmp_path):
    experts_uri = tmp_path / "experts"
    shutil.copytree(built.experts_uri, experts_uri)
    cache_dir = experts_uri / "output-cache" / Path(built.cache.location).name
    part = Path(built.cache.files("train")[0].replace(built.cache.location, str(cache_dir), 1))
    damaged = bytearray(part.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    part.write_bytes(bytes(damaged))
    with pytest.raises(DatasetError, match=f"{part}: SHA-256 differs.*delete {cache_dir}"):
        _ensure(built, experts_uri, [])
    (cache_dir / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DatasetError, match=f"{cache_dir / MANIFEST_FILE}: damaged expert-output cache manifest"):
        _ensure(built, experts_uri, [])


def test_an_experts_actor_that_dies_is_restarted_with_the_experts_read_again_and_answers_the_same(built):
    table = _tag_split(pq.read_table(split_files(built.dataset, "valid")[0]), split="valid")
    options = ActorOptions(use_gpu=False, concurrency=1, gpus_per_actor=0, batch_size=1024, cpus_per_actor=0.1)
    (actor,) = _start_expert_actors((ModelRecipe("digits", MODEL_ARGS).to_json(), str(built.experts_uri)), options)
    try:
        before, pid = ray.get([actor.__call__.remote(table), actor.__ray_call__.remote(lambda _: os.getpid())])
        ray.kill(actor, no_restart=False)  # as a lost node or a killed process would
        after, restarted_pid = ray.get([actor.__call__.remote(table), actor.__ray_call__.remote(lambda _: os.getpid())])
    finally:
        ray.kill(actor)
    assert restarted_pid != pid
    assert after.equals(before) and after.num_rows == table.num_rows
