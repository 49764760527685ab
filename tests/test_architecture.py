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
# an orchestrator reads as named steps: no function of these packages is longer, or takes more parameters
# (constructors aside: a record's fields are its parameters)
SMALL_FUNCTION_PACKAGES = ("train", "tune")
MAX_FUNCTION_LINES = 60
MAX_FUNCTION_PARAMETERS = 8


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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph() -> dict[str, set[str]]:
    """Module -> the platform's modules it imports (``from dynmm.x import y`` counts as module ``dynmm.x.y`` where
    that is a module), lazy and type-checking imports included: a circle through them is a circle all the same."""
    modules = {_module_name(path): path for path in _modules()}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                               else node.module for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
            elif target not in index:
                index[target] = low[target] = len(index)
                stack.append(target)
                work.append((target, iter(sorted(graph[target]))))
            elif target in stack:
                low[node] = min(low[node], index[target])
    return components


def test_modules_form_no_import_circle() -> None:
    assert _cycles(_module_graph()) == []


def test_the_circle_check_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _functions(package: str):
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name != "__init__":
                yield f"{path.relative_to(PACKAGE)}:{node.name}", node


def _parameter_count(node: ast.FunctionDef) -> int:
    arguments = node.args
    names = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
    return len([name for name in names if name.arg not in ("self", "cls")])


@pytest.mark.parametrize("package", SMALL_FUNCTION_PACKAGES)
def test_functions_are_short_and_take_few_parameters(package: str) -> None:
    long = {name: node.end_lineno - node.lineno + 1 for name, node in _functions(package)
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES}
    wide = {name: _parameter_count(node) for name, node in _functions(package)
            if _parameter_count(node) > MAX_FUNCTION_PARAMETERS}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
    assert not wide, f"functions with more than {MAX_FUNCTION_PARAMETERS} parameters: {wide}"


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
