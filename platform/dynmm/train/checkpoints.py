"""Training state on disk: the per-epoch checkpoint and the shared expert weights.

A checkpoint holds the model, the optimiser, where training stands (stage, epoch), the torch RNG state
and the metrics of that epoch. It is read back with ``torch.load(weights_only=True)``: only tensors and
plain containers are stored. The expert weights are written once, atomically, to a path under the
run storage (local folder or any pyarrow filesystem URI such as ``s3://``) and read by every later stage
and every tuning trial.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path

import pyarrow.fs
import torch

STATE_FILE = "state.pt"
EXPERTS_FILE = "experts.pt"
EXPERTS_METRICS_FILE = "experts.json"


def save_state(directory: str | Path, state: dict) -> None:
    torch.save(state, Path(directory) / STATE_FILE)


def load_state(directory: str | Path) -> dict:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def write_experts(uri: str, experts_state: dict, metrics: dict) -> None:
    """Write the experts' state dict and their final validation metrics to ``uri``; readers never see a
    partial file (the weights land last, by rename)."""
    filesystem, root = pyarrow.fs.FileSystem.from_uri(_as_uri(uri))
    filesystem.create_dir(root, recursive=True)
    _write_atomically(filesystem, f"{root}/{EXPERTS_METRICS_FILE}", json.dumps(metrics, indent=1).encode())
    buffer = io.BytesIO()
    torch.save(experts_state, buffer)
    _write_atomically(filesystem, f"{root}/{EXPERTS_FILE}", buffer.getvalue())


def _write_atomically(filesystem: pyarrow.fs.FileSystem, path: str, data: bytes) -> None:
    directory, _, name = path.rpartition("/")
    temporary = f"{directory}/.{name}.{uuid.uuid4().hex}"
    with filesystem.open_output_stream(temporary) as stream:
        stream.write(data)
    filesystem.move(temporary, path)


def read_experts_metrics(uri: str) -> dict | None:
    """The validation metrics of the experts at the end of their stage (static baselines), if trained."""
    data = _read_if_present(uri, EXPERTS_METRICS_FILE)
    return None if data is None else json.loads(data)


def read_experts(uri: str) -> dict | None:
    """The experts' state dict at ``uri``, or None when no expert stage has finished there yet."""
    data = _read_if_present(uri, EXPERTS_FILE)
    return None if data is None else torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _read_if_present(uri: str, name: str) -> bytes | None:
    filesystem, root = pyarrow.fs.FileSystem.from_uri(_as_uri(uri))
    path = f"{root}/{name}"
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_file(path) as stream:
        return stream.read()


def _as_uri(location: str) -> str:
    if "://" in location:
        return location
    return Path(os.path.abspath(location)).as_uri()
