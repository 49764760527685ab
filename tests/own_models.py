"""What the bring-your-own-model tests share: a small table-shaped dataset written with the platform's own writer,
a user's builder module as a team would write it (plain torch modules, a gate returning one logit per path), and a
pipeline that names it, all in folders of the test's choosing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import yaml

from dynmm.data.format import DatasetMeta, ModalitySpec
from dynmm.data.writer import dataset_writer

PROFILE_FEATURES = 6
SIGNAL_SHAPE = (5, 3)
CLASSES = 3
SPLIT_ROWS = {"train": 240, "valid": 60, "test": 60}

# The user's module. ``import_log``: a file each build appends "pid path-of-this-module" to, so a test can see which
# copy of the module every process imported (the pipeline's folder, Ray's py_modules, MLflow's code_paths).
BUILDER_SOURCE = '''\
"""Acme's experts for the profile + signal table: plain torch, no platform code but the model API."""
import os

import torch
from torch import nn

from dynmm.models import ModalityDynMM


class ProfileExpert(nn.Module):
    def __init__(self, features, classes, hidden):
        super().__init__()
        self.modalities = ("profile",)
        self.layers = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, inputs):
        return self.layers(inputs["profile"])


class FusionExpert(nn.Module):
    def __init__(self, features, signal_shape, classes, hidden):
        super().__init__()
        self.modalities = ("profile", "signal")
        width = features + signal_shape[0] * signal_shape[1]
        self.layers = nn.Sequential(nn.Linear(width, 4 * hidden), nn.ReLU(), nn.Linear(4 * hidden, 4 * hidden),
                                    nn.ReLU(), nn.Linear(4 * hidden, classes))

    def forward(self, inputs):
        return self.layers(torch.cat([inputs["profile"], inputs["signal"].flatten(1)], dim=1))


class ProfileGate(nn.Module):
    def __init__(self, features, paths):
        super().__init__()
        self.modalities = ("profile",)
        self.layer = nn.Linear(features, paths)

    def forward(self, inputs):
        return self.layer(inputs["profile"])


def build(meta, hidden=16, import_log=None):
    if import_log:
        with open(import_log, "a") as log:
            log.write(f"{os.getpid()} {__file__}\\n")
    features = meta.modalities["profile"].shape[0]
    signal_shape = meta.modalities["signal"].shape
    experts = [ProfileExpert(features, meta.num_classes, hidden),
               FusionExpert(features, signal_shape, meta.num_classes, hidden)]
    shapes = {name: modality.shape for name, modality in meta.modalities.items()}
    return ModalityDynMM(experts, ProfileGate(features, len(experts)), shapes, expert_names=("profile", "fusion"))
'''


def table_meta(name: str = "acme-table") -> DatasetMeta:
    return DatasetMeta(name=name, task="multiclass", num_classes=CLASSES, source="acme.parquet",
                       modalities={"profile": ModalitySpec(shape=(PROFILE_FEATURES,)),
                                   "signal": ModalitySpec(shape=SIGNAL_SHAPE)})


def write_table_dataset(out_dir: Path, seed: int = 0) -> Path:
    """Three classes: two thirds of the rows are told apart by their profile alone, the rest only by their signal
    (their profile is noise), so the fusion path has something to add."""
    generator = np.random.default_rng(seed)
    with dataset_writer(out_dir, table_meta()) as writer:
        for split, rows in SPLIT_ROWS.items():
            labels = generator.integers(0, CLASSES, rows)
            easy = generator.random(rows) < 2 / 3
            profile = generator.normal(0, 1, (rows, PROFILE_FEATURES))
            profile[easy, labels[easy]] += 3.0
            signal = generator.normal(0, 1, (rows, *SIGNAL_SHAPE))
            signal[~easy, labels[~easy] % SIGNAL_SHAPE[0], :] += 3.0
            writer.write(split, {"profile": profile.astype(np.float32), "signal": signal.astype(np.float32),
                                 "label": labels, "sample_id": [f"{split}-{row}" for row in range(rows)]})
    return out_dir


def write_builder(folder: Path, module: str = "acme_experts", source: str = BUILDER_SOURCE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}.py"
    path.write_text(source)
    return path


def write_pipeline(folder: Path, dataset: Path, model: dict, name: str = "acme", **sections) -> Path:
    """A small pipeline beside which a builder may lie: one worker, a few epochs, a small study."""
    pipeline = {
        "name": name,
        "data": {"dataset": str(dataset), "batch_size": 32, "eval_batch_size": 120},
        "model": model,
        "stages": {"experts": {"epochs": 4, "lr": 0.01},
                   "gate": {"epochs": 2, "lr": 0.05, "lambda": 0.5, "epoch_hard": 1, "holdout_fraction": 0.3}},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "search": {"num_trials": 2, "cohort_size": 2, "sampler": "random", "parameters": {"lambda": {"low": 0.1,
                   "high": 1.0}}, "max_concurrent_trials": 1, "scheduler": {"kind": "moasha", "grace_period": 1}},
        **sections,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


def forget_modules_under(folder: Path) -> None:
    """Forget the builder modules imported from ``folder`` and the ``sys.path`` entries in it, as a new process would
    not know them (a later test's module of the same name in another folder is then not refused as a stranger)."""
    sys.path[:] = [entry for entry in sys.path if not entry.startswith(str(folder))]
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(folder)):
            del sys.modules[name]
