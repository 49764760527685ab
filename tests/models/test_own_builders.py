"""A user's own builder (``model.name: module:function``): found only beside the pipeline file or as an installed
``dynmm.models`` entry point, refused before anything is imported otherwise, and every way it can go wrong one line
with exit code 2 that leaves nothing behind. Real files in the test's folders, no Ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dynmm.builder_source import builder_files, locate_builder, source_digest
from dynmm.cli import main
from dynmm.errors import SpecError
from dynmm.models import DatasetInfo, ModalityDynMM, ModelRecipe, model_recipe
from dynmm.spec import load_pipeline
from dynmm.track.pyfunc import requirements
from own_models import (
    BUILDER_SOURCE,
    forget_modules_under,
    table_meta,
    write_builder,
    write_pipeline,
    write_table_dataset,
)

MARKER_SOURCE = '''\
from pathlib import Path
Path({marker!r}).write_text("imported")


def build(meta, **args):
    raise AssertionError("never called")
'''


@pytest.fixture(autouse=True)
def own_imports_forgotten(tmp_path_factory):
    """Each test imports its own builder modules, as a new process would: those of earlier tests (their folders on
    sys.path, the modules) are forgotten before and after it."""
    forget_modules_under(tmp_path_factory.getbasetemp())
    yield
    forget_modules_under(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_table_dataset(tmp_path_factory.mktemp("table") / "acme-table")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty $DYNMM_HOME and working directory: what a refused command must leave empty."""
    monkeypatch.setenv("DYNMM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def train_exit(capsys, pipeline: Path) -> tuple[int, str]:
    code = main(["train", str(pipeline)])
    return code, capsys.readouterr().err


def refused_in_one_line(code: int, error: str, *expected: str) -> None:
    assert code == 2, error
    assert error.startswith("error: ") and error.count("\n") == 1, error
    for text in expected:
        assert text in error, error


def test_a_builder_beside_the_pipeline_is_called_with_the_datasets_metadata(tmp_path, dataset):
    folder = tmp_path / "pipelines"
    write_builder(folder)
    recipe = model_recipe("acme_experts:build", {"hidden": 8}, str(folder), table_meta())
    model = recipe.build()
    assert isinstance(model, ModalityDynMM) and model.expert_names == ("profile", "fusion")
    assert model.input_shapes == {"profile": (6,), "signal": (5, 3)}
    assert model.experts[0].layers[0].out_features == 8, "model.args reach the builder as keywords"
    assert recipe.digest == source_digest(folder / "acme_experts.py")
    assert recipe.shipped_paths() == [str((folder / "acme_experts.py").resolve())]
    assert str(folder.resolve()) in sys.path and sys.path.index(str(folder.resolve())) > 0, \
        "the pipeline's folder goes at the end of sys.path: nothing in it shadows the platform or its dependencies"


def test_the_metadata_a_builder_gets_is_plain_and_survives_json():
    meta = DatasetInfo.of(table_meta())
    assert (meta.task, meta.num_classes, meta.modalities["signal"].shape) == ("multiclass", 3, (5, 3))
    assert DatasetInfo.of(meta.to_json()) == meta


def test_a_package_beside_the_pipeline_is_a_builder_too(tmp_path):
    package = tmp_path / "pipelines" / "acme_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "experts.py").write_text(BUILDER_SOURCE)
    recipe = model_recipe("acme_pkg.experts:build", {}, str(tmp_path / "pipelines"), table_meta())
    assert recipe.build().num_paths == 2
    assert builder_files("acme_pkg.experts:build", tmp_path / "pipelines") == [str(package.resolve())]


@pytest.mark.parametrize("name", ["os:system", "subprocess:run", "importlib:import_module"])
def test_a_standard_library_builder_is_refused_before_anything_is_imported(tmp_path, home, capsys, dataset, name):
    folder = tmp_path / "pipelines"
    marker = tmp_path / "imported"
    # even a file of that name in the pipeline's folder is never imported
    write_builder(folder, name.split(":")[0], MARKER_SOURCE.format(marker=str(marker)))
    pipeline = write_pipeline(folder, dataset, {"name": name})
    refused_in_one_line(*train_exit(capsys, pipeline), f"model.name {name!r}", "standard-library module")
    assert not marker.exists()
    assert not (home.parent / "home").exists() and list(home.iterdir()) == [], "a refused command writes nothing"


def test_a_module_found_elsewhere_on_sys_path_is_refused_unimported(tmp_path, home, capsys, monkeypatch, dataset):
    elsewhere = tmp_path / "elsewhere"
    marker = tmp_path / "imported"
    write_builder(elsewhere, "stray_builder", MARKER_SOURCE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(elsewhere))
    pipeline = write_pipeline(tmp_path / "pipelines", dataset, {"name": "stray_builder:build"})
    refused_in_one_line(*train_exit(capsys, pipeline), "no stray_builder.py or stray_builder/__init__.py",
                        str((tmp_path / "pipelines").resolve()))
    assert not marker.exists() and "stray_builder" not in sys.modules


def test_a_module_beside_the_pipeline_that_shadows_an_installed_one_is_refused_unimported(tmp_path, home, capsys,
                                                                                           dataset):
    folder = tmp_path / "pipelines"
    marker = tmp_path / "imported"
    write_builder(folder, "yaml", MARKER_SOURCE.format(marker=str(marker)))  # PyYAML is installed
    pipeline = write_pipeline(folder, dataset, {"name": "yaml:build"})
    refused_in_one_line(*train_exit(capsys, pipeline), "the module 'yaml' that Python would import is",
                        "site-packages")
    assert not marker.exists()


@pytest.mark.parametrize(("source", "name", "expected"), [
    (None, "missing_module:build", "no missing_module.py or missing_module/__init__.py in the pipeline's folder"),
    (BUILDER_SOURCE, "acme_experts:no_such_function", "module acme_experts has no function 'no_such_function'"),
    ("import no_such_dependency\n", "acme_experts:build", "importing acme_experts failed: ModuleNotFoundError"),
    ("def build(meta, **args):\n    raise RuntimeError('the GPU is on fire\\nsecond line')\n", "acme_experts:build",
     "model.name 'acme_experts:build': the builder raised RuntimeError: the GPU is on fire"),
    ("def build(meta, **args):\n    return None\n", "acme_experts:build",
     "model.name 'acme_experts:build': the builder returned None, not a dynmm.models.ModalityDynMM or FusionDynMM"),
    ("import torch\ndef build(meta, **args):\n    return torch.nn.Linear(2, 2)\n", "acme_experts:build",
     "returned a torch.nn.modules.linear.Linear, not a dynmm.models.ModalityDynMM"),
    (BUILDER_SOURCE.replace("ProfileGate(features, len(experts))", "ProfileGate(features, 3)"), "acme_experts:build",
     "the gate must return one logit per path, (batch, 2), got (2, 3)"),
    ("def build(meta, **args):\n    return 1\n", "not a builder",
     "model: unknown model 'not a builder'; known models:"),
])
def test_a_builder_that_cannot_build_exits_2_with_one_line_naming_it(tmp_path, home, capsys, dataset, source, name,
                                                                    expected):
    folder = tmp_path / "pipelines"
    module = name.split(":")[0]
    if source is not None:
        write_builder(folder, "acme_experts" if module == "not a builder" else module, source)
    pipeline = write_pipeline(folder, dataset, {"name": name})
    refused_in_one_line(*train_exit(capsys, pipeline), expected)
    assert not (home.parent / "home").exists() and list(home.iterdir()) == []


def test_a_worker_refuses_a_module_that_is_not_the_code_the_pipeline_started_with(tmp_path):
    folder = tmp_path / "pipelines"
    write_builder(folder, "drifting_experts")
    recipe = model_recipe("drifting_experts:build", {}, str(folder), table_meta())
    write_builder(folder, "drifting_experts", BUILDER_SOURCE + "\n# edited after the run began\n")
    with pytest.raises(SpecError, match="which is not the code of .* this pipeline was read with"):
        recipe.build()


def test_a_worker_without_the_pipelines_folder_says_the_module_was_not_shipped(tmp_path):
    recipe = ModelRecipe("never_shipped:build", {}, str(tmp_path / "gone"), DatasetInfo.of(table_meta()).to_json(),
                         digest="0" * 64)
    with pytest.raises(SpecError, match="not on this machine and the runtime environment did not ship it"):
        recipe.build()


def test_set_model_name_still_looks_beside_the_pipeline_file(tmp_path, dataset):
    folder = tmp_path / "pipelines"
    write_builder(folder)
    pipeline = write_pipeline(folder, dataset, {"name": "late-fusion"})
    spec = load_pipeline(pipeline, ["model.name=acme_experts:build", "model.args.hidden=4"])
    assert spec.source_dir == str(folder.resolve())
    assert str(folder.resolve()) not in json.dumps(spec.identity(exclude=set())), "no run name holds the folder"
    recipe = model_recipe(spec.model.name, spec.model.args, spec.source_dir, table_meta())
    assert recipe.build().experts[0].layers[0].out_features == 4


@pytest.fixture
def installed_distribution(tmp_path, monkeypatch) -> Path:
    """An installed distribution, as pip leaves one: its module and a dist-info folder declaring a
    ``dynmm.models`` entry point, on sys.path."""
    site = tmp_path / "site-packages"
    write_builder(site, "acme_plugin")
    info = site / "acme_models-1.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-models\nVersion: 1.2.0\n")
    (info / "entry_points.txt").write_text("[dynmm.models]\nacme-fusion = acme_plugin:build\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_an_installed_entry_point_is_a_builder_by_its_name_or_its_value(installed_distribution, tmp_path):
    for name in ("acme-fusion", "acme_plugin:build"):
        recipe = model_recipe(name, {"hidden": 4}, str(tmp_path / "pipelines"), table_meta())
        assert recipe.build().num_paths == 2
        assert recipe.shipped_paths() == [] and recipe.digest is None, "installed where it runs, not shipped"
        assert "acme-models==1.2.0" in requirements(recipe), "the served model installs the distribution"
    assert locate_builder("acme-fusion", None).distribution == "acme-models"


def test_an_unknown_name_lists_the_installed_entry_points(installed_distribution):
    with pytest.raises(SpecError, match=r"unknown model 'acme'; known models: .*\(installed: acme-fusion\)"):
        locate_builder("acme", None, built_in=["digits"])


def test_a_user_model_is_checked_against_the_model_api_before_training(tmp_path, dataset):
    from dynmm.train.prepare import build_checked_model

    folder = tmp_path / "pipelines"
    write_builder(folder, "uneven_experts", BUILDER_SOURCE.replace(
        "nn.Linear(4 * hidden, classes))", "nn.Linear(4 * hidden, classes + 1))"))
    with pytest.raises(SpecError, match=r"every expert must return a tensor of the same shape, got \(2, 3\), \(2, 4\)"):
        build_checked_model(model_recipe("uneven_experts:build", {}, str(folder), table_meta()))
    assert torch.is_grad_enabled()
