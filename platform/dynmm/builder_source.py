"""Where a user's own model builder comes from: a ``module:function`` name resolved only from the pipeline file's
folder (a ``.py`` file or a package beside the YAML) or from an installed distribution's ``dynmm.models`` entry
point, checked before anything is imported; the files that carry it to other processes (Ray's ``py_modules``,
MLflow's ``code_paths``) and the digest by which every process knows that it imports the same code.

The rules, in the order they are checked (each refusal is one ``SpecError`` line, raised before any import):

- ``module:function`` with Python identifiers; any other name must be an entry point's name;
- a standard-library module is never a builder (``os:system`` is refused by name, whatever the folder holds);
- the module's top-level name must be a ``NAME.py`` file or a ``NAME/__init__.py`` package in the pipeline's
  folder (else an installed entry point whose value is exactly ``module:function``);
- the module that importing that name would load must be that file or a byte-identical copy of it (what Ray's
  ``py_modules`` and MLflow's ``code_paths`` put on ``sys.path``): a module of the same name installed or found
  elsewhere on ``sys.path`` is refused, naming where it lies.

Only then is the module imported, by its own name (so that pickles of its classes and its imports of its own
submodules work), with the pipeline's folder appended to the end of ``sys.path`` where no shipped copy is
importable: appended, not prepended, so that nothing in the user's folder can shadow the platform or its
dependencies. Imports neither torch nor Ray: ``dynmm submit`` finds the files to ship without building a model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynmm.errors import SpecError

ENTRY_POINT_GROUP = "dynmm.models"
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_FUNCTION = re.compile(rf"^(?P<module>{_IDENTIFIER}(\.{_IDENTIFIER})*):(?P<function>{_IDENTIFIER})$")


@dataclass(frozen=True)
class BuilderSource:
    """A user's builder, located but not imported: ``path`` is its module file or package folder in the pipeline's
    folder (None for an entry point, or in a process where that folder does not exist and a shipped copy stands
    for it), ``digest`` the SHA-256 of its Python source; ``distribution`` names the installed distribution
    declaring an entry point."""

    name: str
    module: str
    function: str
    path: str | None = None
    digest: str | None = None
    distribution: str | None = None

    @property
    def top_level(self) -> str:
        return self.module.split(".")[0]


def locate_builder(name: str, folder: str | Path | None, digest: str | None = None,
                   built_in: Sequence[str] = ()) -> BuilderSource:
    """Where the builder ``name`` comes from, importing nothing. ``folder``: the pipeline file's folder.
    ``digest``: None in the process that reads the pipeline (the module must then be in ``folder``, and its
    digest is computed); the recorded digest elsewhere (a Ray worker, the registered model), where ``folder`` may
    be absent and a shipped copy of the module stands for it (``import_builder`` checks the copy). ``built_in``:
    the platform's own model names, for the message that refuses an unknown name."""
    match = _MODULE_FUNCTION.match(name)
    if match is None:
        entry_point = _entry_point(name=name)
        if entry_point is None:
            raise SpecError(f"model: unknown model {name!r}; known models: {', '.join(built_in) or 'none'}, "
                            f"module:function (a module beside the pipeline file) or an installed {ENTRY_POINT_GROUP} "
                            f"entry point{_installed()}")
        return _from_entry_point(name, entry_point)
    module, function = match.group("module"), match.group("function")
    top_level = module.split(".")[0]
    if top_level in sys.stdlib_module_names or top_level in sys.builtin_module_names:
        raise SpecError(f"model.name {name!r}: {top_level!r} is a standard-library module; a builder is a module in "
                        f"the pipeline's folder or an installed {ENTRY_POINT_GROUP} entry point")
    path = _module_in_folder(folder, top_level)
    if path is None:
        entry_point = _entry_point(value=name)
        if entry_point is not None:
            return _from_entry_point(name, entry_point)
        if digest is None:
            where = folder or "(unknown: the spec was not loaded from a file)"
            raise SpecError(f"model.name {name!r}: no {top_level}.py or {top_level}/__init__.py in the pipeline's "
                            f"folder {where}; a builder is a module beside the pipeline file or an installed "
                            f"{ENTRY_POINT_GROUP} entry point{_installed()}")
        return BuilderSource(name, module, function, None, digest)
    return BuilderSource(name, module, function, str(path), digest or source_digest(path))


def builder_files(name: str, folder: str | Path | None) -> list[str]:
    """The module file or package folder a ``module:function`` model name needs shipped with a job (refused as
    ``locate_builder`` refuses it); empty for any other name: a built-in, ``late-fusion`` or an entry point, which
    is installed where the job runs."""
    if _MODULE_FUNCTION.match(name) is None:
        return []
    source = locate_builder(name, folder)
    return [source.path] if source.path is not None else []


def import_builder(source: BuilderSource, folder: str | Path | None) -> Callable:
    """The builder function of a located source: an entry point loaded from its distribution, or the module
    imported by its own name once the module that name resolves to is known to be the pipeline folder's (its
    digest); the folder is appended to ``sys.path`` where no copy of the module is importable yet."""
    if source.distribution is not None:
        return _load_entry_point(source)
    importlib.invalidate_caches()  # a module written after this process listed its folder
    found = _find_top_level(source)
    if found is None and source.path is None:
        raise SpecError(
            f"model.name {source.name!r}: module {source.top_level!r} is not importable in this process: the "
            f"pipeline's folder {folder} is not on this machine and the runtime environment did not ship it")
    if _digest_or_none(found or Path(source.path)) != source.digest:
        raise SpecError(
            f"model.name {source.name!r}: the module {source.top_level!r} that Python would import is "
            f"{found or source.path}, which is not the code of {source.path or folder} this pipeline was read with "
            "(a module of that name installed or elsewhere on sys.path, another pipeline's folder this process read "
            "included, or the file changed since); rename the builder's module")
    if found is None and str(Path(source.path).parent) not in sys.path:
        sys.path.append(str(Path(source.path).parent))
    try:
        module = importlib.import_module(source.module)
    except Exception as error:  # noqa: BLE001 - the user's module: any failure is theirs to fix, in one line
        raise SpecError(f"model.name {source.name!r}: importing {source.module} failed: {_one_line(error)}") from None
    builder = getattr(module, source.function, None)
    if not callable(builder):
        raise SpecError(f"model.name {source.name!r}: module {source.module} has no function {source.function!r}")
    return builder


def source_digest(path: str | Path) -> str:
    """SHA-256 of a module's Python source: the file's bytes, or a package's ``*.py`` files (relative path and
    bytes, in sorted order; ``__pycache__`` left out)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        file for file in path.rglob("*.py") if "__pycache__" not in file.relative_to(path).parts)
    for file in files:
        digest.update(file.relative_to(path.parent).as_posix().encode() + b"\0")
        digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()


def _module_in_folder(folder: str | Path | None, top_level: str) -> Path | None:
    if folder is None or not Path(folder).is_dir():
        return None
    single_file, package = Path(folder) / f"{top_level}.py", Path(folder) / top_level
    if single_file.is_file():
        return single_file.resolve()
    if (package / "__init__.py").is_file():
        return package.resolve()
    return None


def _find_top_level(source: BuilderSource) -> Path | None:
    """The file or package folder that importing the top-level name would load (None: nothing importable).
    ``find_spec`` of a top-level name runs no module code: it asks the path finders where the module lies."""
    try:
        spec = importlib.util.find_spec(source.top_level)
    except (ImportError, ValueError):  # a module in sys.modules without a spec: not a file we can compare
        return Path(f"<module {source.top_level} without a source file>")
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin) if spec.origin else Path(f"<module {source.top_level} without a source file>")


def _digest_or_none(location: Path) -> str | None:
    try:
        return source_digest(location) if location.exists() else None
    except OSError:
        return None


def _entry_point(name: str | None = None, value: str | None = None) -> importlib.metadata.EntryPoint | None:
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (name is not None and entry_point.name == name) or (
                value is not None and entry_point.value.replace(" ", "") == value):
            return entry_point
    return None


def _from_entry_point(name: str, entry_point: importlib.metadata.EntryPoint) -> BuilderSource:
    distribution = entry_point.dist.name if entry_point.dist is not None else entry_point.module.split(".")[0]
    return BuilderSource(name, entry_point.module, entry_point.attr, distribution=distribution)


def _load_entry_point(source: BuilderSource) -> Callable:
    entry_point = _entry_point(value=f"{source.module}:{source.function}")
    if entry_point is None:
        raise SpecError(f"model.name {source.name!r}: the {ENTRY_POINT_GROUP} entry point of {source.distribution} "
                        "is not installed in this process's environment")
    try:
        return entry_point.load()
    except Exception as error:  # noqa: BLE001 - an installed plugin that fails to load: one line naming it
        raise SpecError(f"model.name {source.name!r}: loading the entry point {entry_point.value} of "
                        f"{source.distribution} failed: {_one_line(error)}") from None


def _installed() -> str:
    names = sorted(entry_point.name for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    return f" (installed: {', '.join(names)})" if names else ""


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
