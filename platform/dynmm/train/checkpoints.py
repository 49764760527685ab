"""Training state on disk: the per-epoch checkpoint and the shared expert weights.

A checkpoint holds the model, the optimiser, where training stands (stage, epoch), the torch RNG state, the
metrics of that epoch and, where the stage under way keeps its validation-best epoch, that epoch's weights and
metrics (``kept``: the run's result, ``result_weights``); beside them, ``epochs.json`` holds the metrics of every
epoch so far, from which a resumed driver logs the epochs that never reached MLflow. It is read back with
``torch.load(weights_only=True)``: only tensors and plain containers are stored. Checkpoints live in the run's
``CheckpointStore``; rank 0 writes them at the job's pace (``Checkpointer``). The expert weights are written once,
atomically, to a path under the run storage (local folder or any pyarrow filesystem URI such as ``s3://``) and
read by every later stage and every tuning trial.
"""

from __future__ import annotations

import io
import json
import pickle
import time
import uuid
import warnings
from dataclasses import asdict
from pathlib import Path

import pyarrow.fs
import torch

from dynmm.errors import UserError
from dynmm.train.job import CheckpointPlan
from dynmm.train.state import KeptEpoch, Position, StageRun, WorkerState
from dynmm.train.store import CheckpointStore, filesystem_of

STATE_FILE = "state.pt"
EPOCHS_FILE = "epochs.json"  # every epoch's metrics up to the checkpoint's (plain JSON, read by the driver)
EXPERTS_FILE = "experts.pt"
EXPERTS_METRICS_FILE = "experts.json"


def save_state(directory: str | Path, state: dict) -> None:
    torch.save(state, Path(directory) / STATE_FILE)


def save_epoch_history(directory: str | Path, history: list[dict[str, float]]) -> None:
    (Path(directory) / EPOCHS_FILE).write_text(json.dumps(history))


def read_epoch_history(directory: str | Path) -> list[dict[str, float]]:
    """The metrics of every epoch up to a checkpoint's, oldest first (empty for a checkpoint without them);
    numbers only: anything else in the file is left out."""
    path = Path(directory) / EPOCHS_FILE
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(history, list):
        return []
    return [{k: float(v) for k, v in epoch.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            for epoch in history if isinstance(epoch, dict)]


def load_state(directory: str | Path) -> dict:
    """The training state in ``directory``; a crafted, truncated or foreign file is one ``UserError`` naming it."""
    path = Path(directory) / STATE_FILE
    state = _load_tensors(path, str(path))
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path}: not a dynmm checkpoint (expected a dict with the model's weights under 'model')")
    return state


def _load_tensors(source: str | Path | io.BytesIO, name: str):
    """``torch.load(weights_only=True)``: tensors and plain containers only; anything else is refused."""
    try:
        with warnings.catch_warnings():  # a crafted file's pickle protocol warning: the one line below says it all
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{name}: no such checkpoint file") from None
    except pickle.UnpicklingError as error:
        # torch's message is many lines and suggests weights_only=False; keep only what it found
        found = [line.strip() for line in str(error).splitlines()
                 if "nsupported" in line and not line.startswith(("Weights only", "Please file"))]
        detail = f" ({found[0][:200]})" if found else ""
        raise UserError(f"{name}: refused, it holds more than tensors and plain containers{detail}") from None
    except (RuntimeError, EOFError, ValueError, TypeError, AttributeError, UnicodeDecodeError, OSError) as error:
        reason = str(error).strip().split(". ")[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{name}: damaged or truncated, not a readable checkpoint ({reason[:200]})") from None


def write_experts(uri: str, experts_state: dict, metrics: dict) -> None:
    """Write the experts' state dict and their final validation metrics to ``uri``; readers never see a
    partial file (the weights land last, by rename)."""
    filesystem, root = filesystem_of(uri)
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
    return None if data is None else _load_tensors(io.BytesIO(data), f"{uri.rstrip('/')}/{EXPERTS_FILE}")


def _read_if_present(uri: str, name: str) -> bytes | None:
    filesystem, root = filesystem_of(uri)
    path = f"{root}/{name}"
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_file(path) as stream:
        return stream.read()


def checkpoint_state(state: WorkerState, run: StageRun, epoch: int, metrics: dict[str, float]) -> dict:
    """Tensors and plain containers only (read back with ``weights_only=True``)."""
    saved = {
        "model": state.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "position": asdict(Position(run.index, epoch, state.global_step)),
        "rng": torch.get_rng_state(),
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    if state.kept is not None:
        kept = state.kept
        saved["kept"] = {"stage_index": kept.stage_index, "objective": kept.objective, "metrics": kept.metrics,
                         "model": kept.model}
    return saved


def restored_kept_epoch(saved: dict) -> KeptEpoch | None:
    return KeptEpoch(**saved["kept"]) if "kept" in saved else None


def result_weights(saved: dict) -> dict:
    """The weights a checkpoint hands on as its run's result: the kept epoch's where the stage keeps its best
    epoch, else the model's as it was at that epoch."""
    return saved["kept"]["model"] if "kept" in saved else saved["model"]


def result_metrics(saved: dict) -> dict[str, float]:
    """The metrics of the epoch ``result_weights`` come from."""
    return dict(saved["kept"]["metrics"]) if "kept" in saved else dict(saved["metrics"])


class Checkpointer:
    """A worker's side of its run's ``CheckpointStore``: every rank reads the latest checkpoint to resume from;
    rank 0 alone writes, at the pace of the job's ``CheckpointPlan`` (or when ``force``d)."""

    def __init__(self, plan: CheckpointPlan, rank: int) -> None:
        self.plan = plan
        self.rank = rank
        self.store = CheckpointStore(plan.run_location, plan.num_to_keep)
        self.saved_at = time.monotonic()

    def latest(self):
        return self.store.latest()

    def due(self, epoch: int, force: bool = False) -> bool:
        return self.rank == 0 and (force or self.plan.due(epoch, time.monotonic() - self.saved_at))

    def save(self, directory: str | Path, global_step: int) -> None:
        self.store.save(directory, f"step-{global_step:06d}")
        self.saved_at = time.monotonic()
