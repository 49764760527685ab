"""How every process builds the same model: a ``ModelRecipe`` (the pipeline's ``model.name`` and ``model.args``, the
pipeline's folder, the dataset's metadata as plain values and the digest of a user's builder code) and its
``build``, which dispatches on the name: a built-in task builder, ``late-fusion``, or a user's own builder
(``dynmm.builder_source``) called as ``function(meta, **args)``.

A recipe is plain data (JSON values only), so it crosses into Ray workers inside the worker job, into the
expert-output cache's actors and into a registered model's config unchanged, and each of them builds the model
the driver checked. What a user's builder returns is checked against the public model API (docs/models.md): a
``ModalityDynMM`` or ``FusionDynMM``; a builder that is missing, raises or returns anything else is one
``SpecError`` naming the builder. Imports torch only (no ray, mlflow, spec or data: ``meta`` is duck-typed).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dynmm.builder_source import BuilderSource, import_builder, locate_builder
from dynmm.errors import SpecError
from dynmm.models.builders import MODEL_BUILDERS, build_model
from dynmm.models.dynmm import ModalityDynMM
from dynmm.models.fusion import FusionDynMM
from dynmm.models.late_fusion import LATE_FUSION, build_late_fusion_model


@dataclass(frozen=True)
class ModalityInfo:
    """One modality as a builder sees it: the shape of one sample (no batch axis) and its stored dtype."""

    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class DatasetInfo:
    """What a builder learns of the dataset (its ``meta`` argument): ``task`` (regression, binary, multiclass,
    multilabel, segmentation), ``num_classes`` (None for regression), ``modalities`` (name -> ``ModalityInfo``),
    ``label_names`` (the user's label of each class index, where the dataset recorded them) and ``name``."""

    name: str
    task: str
    num_classes: int | None
    modalities: Mapping[str, ModalityInfo]
    label_names: tuple | None = None

    @classmethod
    def of(cls, meta: Any) -> DatasetInfo:
        """From a dataset's metadata: any object with these attributes (``dynmm.data.DatasetMeta``) or a mapping of
        them (``to_json``'s output)."""
        read = meta.get if isinstance(meta, Mapping) else lambda key, default=None: getattr(meta, key, default)
        modalities = {}
        for name, modality in read("modalities").items():
            shape = modality["shape"] if isinstance(modality, Mapping) else modality.shape
            dtype = modality.get("dtype", "float32") if isinstance(modality, Mapping) else modality.dtype
            modalities[name] = ModalityInfo(tuple(int(size) for size in shape), str(dtype))
        label_names = read("label_names", None)
        return cls(str(read("name", "")), str(read("task")), read("num_classes"), modalities,
                   tuple(label_names) if label_names is not None else None)

    def to_json(self) -> dict:
        return {"name": self.name, "task": self.task, "num_classes": self.num_classes,
                "modalities": {name: {"shape": list(info.shape), "dtype": info.dtype}
                               for name, info in self.modalities.items()},
                "label_names": list(self.label_names) if self.label_names is not None else None}


@dataclass(frozen=True)
class ModelRecipe:
    """``name`` and ``args`` as the pipeline gives them; ``folder``: the pipeline file's folder (where a
    ``module:function`` builder lies); ``dataset``: ``DatasetInfo.to_json()`` of the dataset it trains on;
    ``digest``: the SHA-256 of a user's builder module, recorded where the pipeline was read, so that every other
    process imports that same code (``dynmm.builder_source``)."""

    name: str
    args: dict = field(default_factory=dict)
    folder: str | None = None
    dataset: dict | None = None
    digest: str | None = None

    @property
    def reads_dataset(self) -> bool:
        """Built from the dataset's metadata (``late-fusion``, a user's builder), not from ``args`` alone."""
        return self.name not in MODEL_BUILDERS

    @property
    def own_builder(self) -> bool:
        """A user's builder (``module:function`` or an entry point), not one that ships with the platform."""
        return self.name not in MODEL_BUILDERS and self.name != LATE_FUSION

    def source(self) -> BuilderSource | None:
        """Where a user's builder comes from (importing nothing); None for a built-in name or ``late-fusion``."""
        if not self.own_builder:
            return None
        return locate_builder(self.name, self.folder, self.digest, built_in=[*MODEL_BUILDERS, LATE_FUSION])

    def shipped_paths(self) -> list[str]:
        """The user's module file or package folder that other processes need (Ray ``py_modules``, MLflow
        ``code_paths``); empty for a built-in model or an installed entry point."""
        source = self.source()
        return [source.path] if source is not None and source.path is not None else []

    def build(self) -> ModalityDynMM | FusionDynMM:
        if self.name in MODEL_BUILDERS:
            return build_model(self.name, **self.args)
        if self.dataset is None:
            raise SpecError(f"model.name {self.name!r}: building it needs the dataset's metadata")
        meta = DatasetInfo.of(self.dataset)
        if self.name == LATE_FUSION:
            _check_arguments(LATE_FUSION, build_late_fusion_model, self.args)
            try:
                return build_late_fusion_model(meta, **self.args)
            except (ValueError, TypeError) as error:
                raise SpecError(f"model.args: {error}") from None
        return _call_own_builder(self.name, import_builder(self.source(), self.folder), meta, self.args)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> ModelRecipe:
        return cls(**{name: values[name] for name in cls.__dataclass_fields__ if name in values})


def model_recipe(name: str, args: Mapping[str, Any], folder: str | None, meta: Any) -> ModelRecipe:
    """The recipe of a pipeline's model where the pipeline is read: a user's builder is located now (refused
    before anything is imported where it is not allowed) and its digest recorded."""
    recipe = ModelRecipe(name, dict(args), folder, DatasetInfo.of(meta).to_json())
    source = recipe.source()
    return ModelRecipe(name, dict(args), folder, recipe.dataset, source.digest if source else None)


def _call_own_builder(name: str, builder: Callable, meta: DatasetInfo, args: Mapping[str, Any]):
    try:
        model = builder(meta, **args)
    except Exception as error:  # noqa: BLE001 - the user's code: whatever it raises is one line naming it
        text = str(error).strip().splitlines()
        raise SpecError(f"model.name {name!r}: the builder raised {type(error).__name__}"
                        f"{': ' + text[0] if text else ''}") from None
    if not isinstance(model, ModalityDynMM | FusionDynMM):
        raise SpecError(f"model.name {name!r}: the builder returned {_described(model)}, not a "
                        "dynmm.models.ModalityDynMM or FusionDynMM (see docs/models.md)")
    return model


def check_model_contract(name: str, model: ModalityDynMM | FusionDynMM) -> None:
    """A user's model, run once on two random samples: the gate gives one logit per path and every expert the same
    output shape; a breach is one ``SpecError`` naming the builder, before anything trains."""
    if isinstance(model, FusionDynMM):
        return
    inputs = model.example_inputs(2)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model.gate(inputs)
            outputs = [expert(inputs) for expert in model.experts]
    except Exception as error:  # noqa: BLE001 - the user's modules: a failure is theirs, in one line
        text = str(error).strip().splitlines()
        raise SpecError(f"model.name {name!r}: the model fails on two samples of the dataset's shapes: "
                        f"{type(error).__name__}{': ' + text[0] if text else ''}") from None
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, model.num_paths):
        raise SpecError(f"model.name {name!r}: the gate must return one logit per path, (batch, {model.num_paths}), "
                        f"got {_shape(logits)}")
    shapes = {_shape(output) for output in outputs}
    if len(shapes) != 1 or not all(isinstance(output, torch.Tensor) for output in outputs):
        raise SpecError(f"model.name {name!r}: every expert must return a tensor of the same shape, got "
                        f"{', '.join(_shape(output) for output in outputs)}")


def _check_arguments(name: str, builder: Callable, args: Mapping[str, Any]) -> None:
    accepted = [parameter for parameter in inspect.signature(builder).parameters if parameter != "meta"]
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise SpecError(f"model.args: model {name!r} got unknown argument(s) {', '.join(unknown)}; accepted: "
                        f"{', '.join(accepted)}")


def _described(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__module__}.{type(value).__qualname__}"


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else _described(value)
