"""The README's worked example (examples/breast_cancer) stays true: its table imports with the command the README
and bench/byo_example.py give, and both of its pipelines build a DynMM model from the imported dataset that routes a
batch of its rows; the full study is bench/byo_example.py's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dynmm.cli import main
from dynmm.data.readers import load_split
from dynmm.models import ModalityDynMM
from dynmm.spec import load_pipeline
from dynmm.train.prepare import pipeline_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "breast_cancer"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("byo-example")
    bench = _load(ROOT / "bench" / "byo_example.py", "byo_example_bench")
    return bench.prepare(folder, env=None)


def test_the_table_imports_as_three_modalities_with_the_users_labels(dataset, capsys):
    assert main(["data", "show", str(dataset)]) == 0
    shown = capsys.readouterr().out
    assert "mean" in shown and "error" in shown and "worst" in shown
    train = load_split(dataset, "train")
    assert train["mean"].shape[1:] == (10,) and train["worst"].shape[1:] == (10,)
    assert abs(float(train["mean"].mean())) < 0.1, "standardised with the train split's statistics"


@pytest.mark.parametrize("pipeline", ["late_fusion.yaml", "own_model.yaml"])
def test_each_pipeline_builds_a_model_that_routes_the_datasets_rows(dataset, pipeline):
    spec = load_pipeline(EXAMPLE / pipeline, [f"data.dataset={dataset}"])
    model = pipeline_model(spec).build()
    assert isinstance(model, ModalityDynMM) and model.num_paths == 2
    batch = {name: values[:16] for name, values in load_split(dataset, "valid").items() if name in model.input_shapes}
    with torch.no_grad():
        routed = model(batch, mode="routed")
    assert routed.output.shape == (16, 2) and set(routed.paths.tolist()) <= {0, 1}
    sys.modules.pop("cancer_experts", None)
