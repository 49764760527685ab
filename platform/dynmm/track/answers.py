"""Routed answers of a served DynMM model: one request or many, answered as one batch.

Shared by the MLflow pyfunc (one request per call) and ``dynmm serve`` (the requests Ray Serve gathered):
the gate runs once per group of samples that miss the same modalities, each expert once on only the samples
routed to it (``dynmm.models.degraded``; held to a strict compute budget where one is set,
``dynmm.models.budget``), and each request gets its own rows back, in order:

- ``prediction`` (null where refused), ``path`` and ``path_name`` (the path taken; null where refused),
  ``gflops`` (what the sample cost: its path and the gate; the expert alone where the gate could not read
  the sample; 0 where refused);
- ``degraded`` (the sample lacked a modality), ``missing_modalities`` (comma-separated, empty if none);
- ``error``: null, or why the sample was refused (a missing modality, or the compute budget);
- with a budget only: ``budget_demoted``, whether the budget sent the sample to a cheaper path than the
  gate chose.

A request whose model output is not finite is refused whole (its ``ValueError``); the other requests of the
batch are still answered. The model is rebuilt from its recipe (``dynmm.models.recipe.ModelRecipe``; a config
written before recipes: its builder name and arguments) plus a state dict read with
``torch.load(weights_only=True)``: no pickled module. Where the model's dataset recorded the user's label names,
``prediction`` is the user's own label.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dynmm.models import ModalityDynMM, flops_to_gflops, measure_path_costs
from dynmm.models.budget import ComputeBudget, route_within_budget
from dynmm.models.degraded import fallback_order, route_with_missing
from dynmm.models.recipe import ModelRecipe
from dynmm.track.requests import MISSING_MARKER, Request, merge_requests

# nullable dtypes: a refused sample has no prediction and no path (else: per-row lists, None when refused)
PREDICTION_DTYPES = {"multiclass": "Int64", "binary": "Int64", "regression": "Float64"}
COLUMNS = ("prediction", "path", "path_name", "gflops", "degraded", MISSING_MARKER, "error")
BUDGET_COLUMN = "budget_demoted"


@dataclass
class ServedModel:
    """A model ready to answer: its config (``write_model_files``), the built model in evaluation mode, the
    fallback order for samples the gate cannot read, and the compute budget it is held to (or None)."""

    config: dict[str, Any]
    model: torch.nn.Module
    fallback: list[int]
    budget: ComputeBudget | None = None
    _expert_gflops: list[float] | None = field(default=None, repr=False)

    def expert_gflops(self) -> list[float]:
        """Each expert alone (what a sample pays that skipped the gate), measured once, when first needed."""
        if self._expert_gflops is None:
            costs = measure_path_costs(self.model)
            self._expert_gflops = [flops_to_gflops(flops) for flops in costs.expert_flops]
        return self._expert_gflops

    def row_gflops(self, paths: np.ndarray, gate_ran: np.ndarray) -> np.ndarray:
        """What each sample cost: its path with the gate, the expert alone where the gate could not read it
        (a fallback), nothing where it was refused."""
        gflops = np.zeros(len(paths))
        chosen = gate_ran & (paths >= 0)
        gflops[chosen] = np.asarray(self.config["path_gflops"], dtype=np.float64)[paths[chosen]]
        fallback = ~gate_ran & (paths >= 0)
        if fallback.any():
            gflops[fallback] = np.asarray(self.expert_gflops())[paths[fallback]]
        return gflops


def load_served_model(
    config: Mapping[str, Any], weights: str | Path | bytes, max_gflops_per_sample: float | None = None,
) -> ServedModel:
    """The model of a config and its weights (a path or the file's bytes), held to ``max_gflops_per_sample``
    per batch where given (a ``ValueError`` when no batch could meet it)."""
    model = recipe_of(config).build()
    source = io.BytesIO(weights) if isinstance(weights, bytes) else weights
    model.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    served = ServedModel(dict(config), model.eval(),
                         fallback_order(config["path_gflops"], config.get("expert_validation_quality")))
    if max_gflops_per_sample is not None:
        if not isinstance(model, ModalityDynMM):
            raise ValueError(f"a strict compute budget needs a modality-level DynMM (one expert per path); "
                             f"{recipe_of(config).name!r} decides its paths inside its forward")
        served.budget = ComputeBudget(max_gflops_per_sample, tuple(config["path_gflops"]),
                                      tuple(served.expert_gflops()))
    return served


def answer_requests(served: ServedModel, requests: Sequence[Request]) -> list[pd.DataFrame | ValueError]:
    """Each request's rows (a DataFrame, as the pyfunc returns it), or the ``ValueError`` that refuses it."""
    return [answer if isinstance(answer, ValueError) else result_frame(answer, served.config)
            for answer in answer_columns(served, requests)]


def answer_columns(served: ServedModel, requests: Sequence[Request]) -> list[dict[str, list] | ValueError]:
    """Each request's rows as columns of plain Python values (what a JSON answer holds), or the ``ValueError``
    that refuses it, from one routed batch."""
    if not requests:
        return []
    batch, spans = merge_requests(requests)
    config = served.config
    if batch.size == 0:
        return [result_columns(config, [], np.zeros(0, dtype=np.int64), np.zeros(0), r.missing, ()) for r in requests]
    missing = {name: torch.from_numpy(rows) for name, rows in batch.missing.items() if rows.any()}
    demoted = None
    with torch.no_grad():
        if served.budget is None:
            routed = route_with_missing(served.model, batch.inputs, missing, served.fallback)
        else:
            routed, demoted = route_within_budget(served.model, batch.inputs, missing, served.fallback,
                                                  served.budget)
    paths = routed.paths.numpy()
    gflops = served.row_gflops(paths, routed.gate_ran.numpy())
    answers: list[dict[str, list] | ValueError] = []
    for request, rows in zip(requests, spans, strict=True):
        try:
            per_row = _predicted_rows(config, routed.output[rows], routed.answered[rows])
        except ValueError as error:
            answers.append(error)
            continue
        answers.append(result_columns(config, per_row, paths[rows], gflops[rows], request.missing,
                                      routed.errors[rows], None if demoted is None else demoted[rows].numpy()))
    return answers


def _predicted_rows(config: Mapping[str, Any], output: torch.Tensor, answered: torch.Tensor) -> list:
    """One prediction per row of a request, None where the sample was refused."""
    if not answered.any():
        return [None] * len(answered)
    refuse_nonfinite_outputs(output[answered], torch.nonzero(answered).squeeze(1))
    predicted = iter(predictions(config["task"], output[answered], label_names_of(config)))
    return [next(predicted) if row_answered else None for row_answered in answered.tolist()]


def result_columns(
    config: Mapping[str, Any], predicted: list, paths: np.ndarray, gflops: np.ndarray,
    missing: Mapping[str, np.ndarray], errors: Sequence[str | None], demoted: np.ndarray | None = None,
) -> dict[str, list]:
    """One value per sample in each column, in request order (None where a refused sample has none)."""
    paths = paths.astype(np.int64).tolist()
    names = list(config["input_shapes"])
    missing_per_row = [",".join(name for name in names if missing[name][row]) for row in range(len(paths))]
    columns = {
        "prediction": list(predicted),
        "path": [path if path >= 0 else None for path in paths],
        "path_name": [config["path_names"][path] if path >= 0 else None for path in paths],
        "gflops": np.asarray(gflops, dtype=np.float64).tolist(),
        "degraded": [bool(absent) for absent in missing_per_row],
        MISSING_MARKER: missing_per_row,
        "error": list(errors) or [None] * len(paths),
    }
    if demoted is not None:
        columns[BUDGET_COLUMN] = np.asarray(demoted, dtype=bool).tolist()
    return columns


def result_frame(columns: Mapping[str, list], config: Mapping[str, Any]) -> pd.DataFrame:
    """The columns as a DataFrame with the same dtypes whatever the rows (an empty batch too); nullable
    prediction and path where a refused sample has none (the user's labels: objects)."""
    prediction = object if label_names_of(config) is not None else PREDICTION_DTYPES.get(config["task"], object)
    dtypes = {"prediction": prediction, "path": "Int64", "path_name": object,
              "gflops": np.float64, "degraded": bool, MISSING_MARKER: object, "error": object, BUDGET_COLUMN: bool}
    return pd.DataFrame({name: pd.Series(values, dtype=dtypes[name]) for name, values in columns.items()})


def refuse_nonfinite_outputs(output: torch.Tensor, rows: torch.Tensor) -> None:
    finite = torch.isfinite(output.reshape(len(output), -1)).all(dim=1)
    if not finite.all():
        sample = int(rows[torch.nonzero(~finite)[0]])
        raise ValueError(f"the model's output for sample {sample} is not finite: inputs far beyond its training data?")


def predictions(task: str, output: torch.Tensor, label_names: Sequence | None = None) -> list:
    """The model's answer per sample: a class index (binary, multiclass), 0/1 per class (multilabel) or a number;
    with ``label_names`` the user's own label (multilabel: the list of labels predicted present)."""
    if task == "multiclass":
        indices = output.argmax(dim=1).tolist()
    elif task == "binary":
        indices = (output.reshape(-1) > 0).long().tolist()
    elif task == "multilabel":
        present = (output > 0).long().tolist()
        if label_names is None:
            return present
        return [[label_names[index] for index, flag in enumerate(row) if flag] for row in present]
    else:
        return output.reshape(-1).tolist()
    return indices if label_names is None else [label_names[index] for index in indices]


def label_names_of(config: Mapping[str, Any]) -> list | None:
    """The user's label of each class index, where the model's dataset recorded them."""
    return config.get("label_names")


def recipe_of(config: Mapping[str, Any]) -> ModelRecipe:
    """The recipe a model's config holds (one written before recipes existed: its builder name and arguments)."""
    if "model" in config:
        return ModelRecipe.from_json(config["model"])
    return ModelRecipe(config["model_name"], dict(config["model_args"]))
