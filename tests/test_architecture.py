"""The module map holds: each package imports only what the architecture allows, the packages form no cycle,
every module is placed in docs/architecture.md, and no module grows past what one reader can hold."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = PROJECT / "platform" / "dynmm"

# package -> imports it must not make (a dynmm package, or a third-party top-level name / dotted prefix)
FORBIDDEN = {
    "spec": {"ray", "mlflow", "torch", "dynmm.models", "dynmm.train", "dynmm.tune", "dynmm.track"},
    "models": {"ray", "mlflow", "dynmm.spec", "dynmm.data", "dynmm.train", "dynmm.tune", "dynmm.track"},
    "data": {"mlflow", "ray.train", "dynmm.models", "dynmm.train", "dynmm.tune", "dynmm.track"},
    "train": {"dynmm.tune", "dynmm.cluster", "dynmm.cli"},
    "tune": {"dynmm.cluster", "dynmm.cli"},
    "track": {"ray", "dynmm.tune", "dynmm.train", "dynmm.cluster", "dynmm.cli"},
    "cluster": {"dynmm.train", "dynmm.tune", "dynmm.cli"},
    "serve": {"dynmm.train", "dynmm.tune", "dynmm.cli"},
    "runtime": {"dynmm.train", "dynmm.tune", "dynmm.cluster", "dynmm.track"},
}
MAX_MODULE_LINES = 400


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _package_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _violates(name: str, forbidden: str) -> bool:
    return name == forbidden or name.startswith(forbidden + ".")


@pytest.mark.parametrize("module", _modules(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_module_imports_only_what_its_package_may(module: Path) -> None:
    forbidden = FORBIDDEN.get(_package_of(module), set())
    wrong = sorted(name for name in _imports(module) for rule in forbidden if _violates(name, rule))
    assert not wrong, f"{module.relative_to(PROJECT)} imports {wrong}, which its package must not"


def test_packages_form_no_import_cycle() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for module in _modules():
        source = _package_of(module)
        for name in _imports(module):
            if name.startswith("dynmm."):
                target = name.split(".")[1]
                if target != source:
                    graph[source].add(target)
    visiting, done = set(), set()

    def visit(node: str, trail: list[str]) -> None:
        assert node not in visiting, f"import cycle between packages: {' -> '.join([*trail, node])}"
        if node in done:
            return
        visiting.add(node)
        for target in sorted(graph[node]):
            visit(target, [*trail, node])
        visiting.discard(node)
        done.add(node)

    for package in sorted(graph):
        visit(package, [])


def test_no_module_is_longer_than_one_reading() -> None:
    lines = {str(module.relative_to(PACKAGE)): len(module.read_text().splitlines()) for module in _modules()}
    long = {name: count for name, count in lines.items() if count > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_every_module_is_placed_in_the_module_map() -> None:
    module_map = (PROJECT / "docs" / "architecture.md").read_text()
    unplaced = [str(module.relative_to(PACKAGE)) for module in _modules()
                if f"`{module.relative_to(PACKAGE)}`" not in module_map]
    assert not unplaced, f"modules missing from docs/architecture.md: {unplaced}"


def test_a_training_worker_imports_no_tracking() -> None:
    """Workers only train and report: the loop's imports bring in neither MLflow nor the platform's tracking."""
    import subprocess
    import sys

    probe = "import sys, dynmm.train.loop; print(sorted(m for m in ('mlflow', 'dynmm.track') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
