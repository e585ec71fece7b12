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

# Lowest first; a module may import its own layer and those below. An align module not named here
# is in "training".
CORE = {
    "align",
    "align.core.errors",
    "align.core.registry",
    "align.core.config",
    "align.core.rank",
    "align.core.stage_dir",
    "align.core.fingerprint",
    "align.core.integrity",
    "align.core.heap",
    "align.core.preempt",
    "align.core.gguf",
}
STAGES = {"align.stages", "align.stages.utilities"}
PIPELINE = {
    "align.pipeline.plan",
    "align.pipeline.runner",
    "align.pipeline.status",
    "align.pipeline.recipe",
    "align.stages.run",
}
CLI = {"align.cli", "align.__main__", "align.docs"}
LAYERS = ("core", "sampling and reward", "training", "stages", "pipeline", "cli")


def layer(module: str) -> str:
    if module in CORE:
        return "core"
    if module.split(".")[0] in ("sampling", "reward"):
        return "sampling and reward"
    if module in CLI:
        return "cli"
    if module in PIPELINE:
        return "pipeline"
    if module in STAGES or module.startswith("align.stages."):
        return "stages"
    return "training"


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


def test_the_layer_lists_name_real_modules_and_the_doc_names_every_module():
    known = modules()
    assert CORE | STAGES | PIPELINE | CLI <= set(known), sorted((CORE | STAGES | PIPELINE | CLI) - set(known))
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
