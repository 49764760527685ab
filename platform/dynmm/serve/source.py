"""Which model ``dynmm serve`` serves: a registered version's files (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, or a name with ``--version N``), read as the pyfunc's config and state dict.

Only ``config.json`` (plain JSON) and ``weights.pt`` (``torch.load(weights_only=True)`` when a replica loads
it) are read: the pickled ``python_model.pkl`` of the MLflow model is never loaded. The bytes travel to the
Serve replicas as deployment arguments, so a replica on another node needs no access to the MLflow store.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dynmm.errors import UserError

REGISTRY_SCHEME = "models:/"


@dataclass(frozen=True)
class ModelFiles:
    """What a replica needs to rebuild the model: its config (``dynmm.track.pyfunc.write_model_files``) and
    the bytes of its state dict; ``source`` says where they came from (for messages)."""

    config: dict
    weights: bytes = field(repr=False)
    source: str


def registry_uri(model: str, version: int | None = None) -> str:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` from what the user typed: that URI, or a name (with
    or without ``models:/``) and ``--version N``."""
    if version is not None:
        name = model.removeprefix(REGISTRY_SCHEME)
        if "@" in name or "/" in name:
            raise UserError(f"{model}: --version {version} needs a bare model name, e.g. digits-dynmm")
        return f"{REGISTRY_SCHEME}{name}/{version}"
    if not model.startswith(REGISTRY_SCHEME) or not ("@" in model or "/" in model.removeprefix(REGISTRY_SCHEME)):
        raise UserError(f"{model}: expected models:/NAME@ALIAS or models:/NAME/VERSION (or NAME with --version N), "
                        "or a pipeline YAML with --checkpoint DIR")
    return model


def registered_model_files(model_uri: str, tracking_uri: str) -> ModelFiles:
    """The config and weights of a registered DynMM pyfunc, downloaded from the store at ``tracking_uri``."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from dynmm.track.pyfunc import CONFIG, WEIGHTS
    from dynmm.track.runs import redact_credentials

    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="dynmm-serve-") as folder:
        try:
            local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=folder))
        except MlflowException as error:
            raise UserError(f"{model_uri}: {error.message.splitlines()[0]} (store: "
                            f"{redact_credentials(tracking_uri)}; `dynmm models list` shows what is registered)"
                            ) from None
        artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
        if CONFIG not in artifacts or WEIGHTS not in artifacts:
            raise UserError(f"{model_uri}: not a DynMM model (its pyfunc has no {CONFIG} and {WEIGHTS} artifacts)")
        config = json.loads((local / artifacts[CONFIG]["path"]).read_text())
        weights = (local / artifacts[WEIGHTS]["path"]).read_bytes()
    return ModelFiles(config, weights, model_uri)


def files_of_folder(folder: Path, source: str) -> ModelFiles:
    """The files ``write_model_files`` wrote into ``folder`` (a pipeline checkpoint made servable)."""
    return ModelFiles(json.loads((folder / "config.json").read_text()), (folder / "weights.pt").read_bytes(), source)
