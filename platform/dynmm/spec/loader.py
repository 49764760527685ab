"""Loading a pipeline YAML, applying ``--set`` overrides, and turning validation errors into SpecError."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dynmm.errors import SpecError
from dynmm.spec.models import PipelineSpec

MAX_NODES = 100_000  # values after expanding YAML aliases; shipped pipelines have under a hundred
MAX_DEPTH = 100
MAX_SHOWN_CHARS = 200  # of a rejected value in an error message
MAX_ERRORS_SHOWN = 5


def load_pipeline(path: str | Path, overrides: Iterable[str] = ()) -> PipelineSpec:
    """Read, override and validate a pipeline YAML file; every failure is a SpecError naming ``path``. The spec
    knows the file's folder (``PipelineSpec.source_dir``): a ``module:function`` model builder is looked for there."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: pipeline file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(f"{path}: not a UTF-8 text file (byte {error.start} cannot be decoded)") from None
    except OSError as error:
        raise SpecError(f"{path}: cannot read the pipeline file ({error.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}".replace("\n", " ")) from None
    except RecursionError:
        raise SpecError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of pipeline fields at the top level")
    return parse_pipeline(apply_overrides(raw, overrides, source=path), source=path).located_in(path.parent)


def parse_pipeline(raw: Mapping[str, Any], source: str | Path = "<pipeline>") -> PipelineSpec:
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as error:
        problems = [_describe(item) for item in error.errors()[:MAX_ERRORS_SHOWN]]
        if error.error_count() > MAX_ERRORS_SHOWN:
            problems.append(f"and {error.error_count() - MAX_ERRORS_SHOWN} more")
        raise SpecError(f"{source}: " + "; ".join(problems)) from None


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str], source: str | Path = "<pipeline>") -> dict:
    """Return a copy of ``raw`` with each ``key.path=value`` set; values are parsed as YAML scalars."""
    result = _BoundedCopy(source)(raw)
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
        node[keys[-1]] = _override_value(override, text, source)
    return result


def _override_value(override: str, text: str, source: str | Path) -> Any:
    if not text.strip():
        return None
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as error:
        problem = getattr(error, "problem", None) or "nested too deeply"
        shown = _shorten(repr(override))
        raise SpecError(f"{source}: --set {shown}: the value is not valid YAML ({problem})") from None
    return _BoundedCopy(source)(value)


class _BoundedCopy:
    """Copies a parsed YAML tree, refusing one whose aliases expand past ``MAX_NODES`` or that nests past
    ``MAX_DEPTH``. A "billion laughs" file is small on disk and cheap to parse (an alias is a shared
    reference), but it grows exponentially when copied, validated or printed; a self-referencing alias
    never ends."""

    def __init__(self, source: str | Path) -> None:
        self.source = source
        self.nodes = 0

    def __call__(self, value: Any, depth: int = 0) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise SpecError(f"{self.source}: too many nodes after expanding aliases (more than {MAX_NODES:,})")
        if depth > MAX_DEPTH:
            raise SpecError(f"{self.source}: nested more than {MAX_DEPTH} levels deep (or an alias refers to itself)")
        if isinstance(value, Mapping):
            return {key: self(item, depth + 1) for key, item in value.items()}
        if isinstance(value, list):
            return [self(item, depth + 1) for item in value]
        return value


def _describe(item: Mapping[str, Any]) -> str:
    field = ".".join(str(part) for part in item["loc"]) or "(top level)"
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        return f"{field}: unknown field"
    if item["type"] == "missing":
        return f"{field}: required field is missing"
    return f"{field}: {message} (got {_shorten(repr(item.get('input')))})"


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."
