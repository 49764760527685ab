"""Loading a pipeline YAML, applying ``--set`` overrides, and turning validation errors into SpecError."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dynmm.errors import SpecError
from dynmm.spec.models import PipelineSpec


def load_pipeline(path: str | Path, overrides: Iterable[str] = ()) -> PipelineSpec:
    """Read, override and validate a pipeline YAML file; every failure is a SpecError naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: pipeline file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of pipeline fields at the top level")
    return parse_pipeline(apply_overrides(raw, overrides, source=path), source=path)


def parse_pipeline(raw: Mapping[str, Any], source: str | Path = "<pipeline>") -> PipelineSpec:
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(f"{source}: " + "; ".join(_describe(item) for item in error.errors())) from None


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str], source: str | Path = "<pipeline>") -> dict:
    """Return a copy of ``raw`` with each ``key.path=value`` set; values are parsed as YAML scalars."""
    result = _deep_copy(raw)
    for override in overrides:
        key_path, separator, text = override.partition("=")
        if not separator or not key_path.strip():
            raise SpecError(f"--set {override!r}: expected key.path=value, e.g. stages.gate.lambda=0.01")
        keys = key_path.strip().split(".")
        node = result
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise SpecError(f"{source}: --set {key_path}: {where} is a value, not a section")
            node = child
        node[keys[-1]] = yaml.safe_load(text) if text.strip() else None
    return result


def _deep_copy(raw: Mapping[str, Any]) -> dict:
    return {key: _deep_copy(value) if isinstance(value, Mapping) else value for key, value in raw.items()}


def _describe(item: Mapping[str, Any]) -> str:
    field = ".".join(str(part) for part in item["loc"]) or "(top level)"
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        return f"{field}: unknown field"
    if item["type"] == "missing":
        return f"{field}: required field is missing"
    return f"{field}: {message} (got {item.get('input')!r})"
