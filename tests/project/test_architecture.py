"""The layers of docs/architecture.md, checked on the source: no import goes up a layer, none goes round.

Every ``import`` and ``from ... import`` of the packages ``align``, ``sampling`` and ``reward`` counts,
at the top of a module or inside a function alike: an import deferred into a function (to keep
``import align`` light, or torch out of ``align --help``) is still a dependency, so it may not go up
a layer or close a circle either. Only imports under ``if TYPE_CHECKING:`` are left out (they never
run). The ``import_module`` calls that load modules by name are not imports to this test:
``align.stages`` loads the command modules it finds, and ``align`` (the Python API) the module of
a name when it is first used.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("align", "reward", "sampling")

# Lowest first; a module may import its own layer and those below. A layer is its packages (and a
# few single modules): the package a module sits in says what it may import.
LAYERS = ("core", "sampling and reward", "training", "stages", "pipeline", "cli")
PACKAGE_LAYERS = {
    "align.core": "core",
    "sampling": "sampling and reward",
    "reward": "sampling and reward",
    "align.training": "training",
    "align.tasks": "training",
    "align.rl": "training",
    "align.stages": "stages",
    "align.pipeline": "pipeline",
}
MODULE_LAYERS = {
    "align": "core",  # the version and the Python API's lazy names
    "align.stages.run": "pipeline",  # the commands of the pipeline: run, status, report
    "align.cli": "cli",
    "align.__main__": "cli",
    "align.docs": "cli",
}


def layer(module: str) -> str:
    """The layer of a module: its own entry, else its innermost package's; every module has one."""
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    name = module
    while name:
        if name in PACKAGE_LAYERS:
            return PACKAGE_LAYERS[name]
        name = name.rpartition(".")[0]
    raise AssertionError(f"{module} is in no layer: add its package to PACKAGE_LAYERS and docs/architecture.md")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"
    )


def imports(module: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """{imported module of ours: first line} for every import in ``module`` (nested ones included)."""

    def ours(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found: dict[str, int] = {}

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            targets: list[str | None] = []
            if isinstance(child, ast.Import):
                targets = [ours(alias.name) for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(here[: len(here) - child.level + 1] + ([child.module] if child.module else []))
                targets = [
                    ours(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known else ours(base)
                    for alias in child.names
                ]
            for target in targets:
                if target and target != module:
                    found.setdefault(target, child.lineno)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {module: imports(module, path, known) for module, path in known.items()}


def upward_imports(edges: dict[str, dict[str, int]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [
        f"{module} ({layer(module)}) imports {target} ({layer(target)}, a higher layer) at line {line}"
        for module, targets in edges.items()
        for target, line in targets.items()
        if rank[layer(target)] > rank[layer(module)]
    ]


def cycles(edges: dict[str, dict[str, int]]) -> list[str]:
    """One line per import circle found (depth-first search: each back edge closes one)."""
    found, state, stack = [], {}, []

    def walk(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges.get(module, {})):
            if state.get(target) == "open":
                circle = stack[stack.index(target) :] + [target]
                found.append(
                    " -> ".join(circle) + f" ({circle[-2]} imports {target} at line {edges[circle[-2]][target]})"
                )
            elif target not in state:
                walk(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            walk(module)
    return found


def test_no_import_goes_up_a_layer():
    problems = upward_imports(graph())
    assert not problems, "imports that go up a layer (docs/architecture.md):\n" + "\n".join(problems)


def test_no_import_circle():
    problems = cycles(graph())
    assert not problems, "import circles:\n" + "\n".join(problems)


def test_every_module_is_in_a_layer_and_a_line_of_the_doc():
    known = modules()
    named = set(PACKAGE_LAYERS) | set(MODULE_LAYERS)
    assert named <= set(known), sorted(named - set(known))
    for module in known:
        layer(module)  # raises, naming the module, for one in no layer
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [m for m in known if f"`{m}`" not in doc]
    assert not missing, f"docs/architecture.md has no line for: {', '.join(missing)}"


def test_the_checks_catch_an_upward_import_and_a_circle():
    edges = {"reward.rules": {"align.stages.rlhf": 3}, "align.stages.rlhf": {"reward.rules": 5}}
    assert upward_imports(edges) == [
        "reward.rules (sampling and reward) imports align.stages.rlhf (stages, a higher layer) at line 3"
    ]
    assert cycles(edges) == [
        "align.stages.rlhf -> reward.rules -> align.stages.rlhf (reward.rules imports align.stages.rlhf at line 3)"
    ]
