"""The expert-output cache of a small dataset built in the calling process (no Ray, no actors, no Ray Data pass):
the same rows, in the dataset's order, that the experts compute in evaluation mode, in the layout the Ray build
writes (a build folder named by the manifest), reused by the next call. The Ray build is tests/train/
test_expert_cache.py's."""

from __future__ import annotations

from pathlib import Path

import torch

from dynmm.data.format import read_meta
from dynmm.data.readers import load_split, resolve_dataset
from dynmm.models import ModelRecipe, build_model
from dynmm.train.cache_format import MANIFEST_FILE, read_cache_split
from dynmm.train.checkpoints import write_experts
from dynmm.train.expert_cache import ActorOptions, CacheSource, ensure_expert_cache

ARGS = {"gate": "confidence"}


def test_a_small_datasets_cache_is_built_here_with_what_the_experts_compute_and_reused(tmp_path: Path):
    dataset = resolve_dataset("digits", tmp_path / "datasets")
    torch.manual_seed(5)
    model = build_model("digits", **ARGS)
    with torch.no_grad():
        for parameter in model.experts.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    experts_uri = str(tmp_path / "experts")
    write_experts(experts_uri, model.experts.state_dict(), {})
    source = CacheSource(dataset, read_meta(dataset), ModelRecipe("digits", ARGS), experts_uri)
    options = ActorOptions(in_process=True, batch_size=100)  # several batches per split
    messages: list[str] = []

    cache = ensure_expert_cache(source, options=options, say=messages.append)

    assert len(messages) == 1 and "built for split(s) train, valid" in messages[0]
    assert (Path(cache.location) / MANIFEST_FILE).is_file() and (Path(cache.location) / cache.manifest.build).is_dir()
    model.freeze_experts().eval()
    for split in ("train", "valid"):
        raw = load_split(dataset, split)
        expected = model.frozen_outputs({name: raw[name] for name in model.input_shapes})
        cached = read_cache_split(cache, split, columns=[*cache.tensor_columns, "sample_id"])
        assert cached["sample_id"] == raw["sample_id"] and torch.equal(cached["label"], raw["label"])
        torch.testing.assert_close(cached["expert_outputs"], expected.expert_outputs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cached["gate_features"], expected.gate_features, rtol=1e-6, atol=1e-6)
    again: list[str] = []
    assert ensure_expert_cache(source, options=options, say=again.append).location == cache.location
    assert again == []
