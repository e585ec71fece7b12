"""Stages: each is a typed config plus a run function, registered as an ``align`` command.

A command module registers its commands with ``@command(...)`` (``align.core.registry``) and nothing else
lists it: the command modules are found, not kept in a list (``modules``):

- every module of this package (one stage kind each, ``run``: run, status, report, and
  ``utilities``: make-tiny-model, demo-data, ...);
- the module named by each entry point in the ``align.stages`` group of an installed package (a
  plugin: ``[project.entry-points."align.stages"] mykind = "mypkg.mykind"`` in its pyproject.toml).

``declared()`` reads each command's name, summary, order and Python names from the ``@command``
decorators in the modules' source without importing them (importing a stage imports torch and the
training libraries: seconds), so ``align --help`` and ``import align`` stay fast; ``load()`` imports
the modules, in that order, so that their commands register.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import pkgutil
from pathlib import Path

# The entry-point group of plugin stage modules.
ENTRY_POINTS = "align.stages"


@dataclasses.dataclass(frozen=True)
class Declared:
    """One ``@command(NAME, CONFIG, SUMMARY, ..., order=N)`` as written in ``module``'s source."""

    name: str
    summary: str
    order: int
    module: str
    function: str  # the decorated run function's name: the Python API's run_... function
    config: str  # the config class's name


def modules() -> list[str]:
    """Every command module: this package's modules (by name), then the plugins' (by entry point name)."""
    found = [f"{__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)]
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=ENTRY_POINTS), key=lambda e: e.name):
        if entry.module not in found:
            found.append(entry.module)
    return found


def _literal(call: ast.Call, index: int | None, keyword: str, default=dataclasses.MISSING):
    """A literal argument of ``call``: by keyword, else at position ``index`` (None: keyword only), else ``default``."""
    for kw in call.keywords:
        if kw.arg == keyword:
            return ast.literal_eval(kw.value)
    if index is not None and index < len(call.args):
        return ast.literal_eval(call.args[index])
    if default is dataclasses.MISSING:
        raise ValueError(f"@command(...) without its {keyword}")
    return default


def _config_name(call: ast.Call) -> str:
    node = next((kw.value for kw in call.keywords if kw.arg == "config"), call.args[1] if len(call.args) > 1 else None)
    return node.id if isinstance(node, ast.Name) else ""


def _declared_in(module: str) -> list[Declared]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"command module {module!r} not found")
    tree = ast.parse(Path(spec.origin).read_text(), spec.origin)
    found = []
    for node in tree.body:
        for deco in getattr(node, "decorator_list", []):
            if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Name) and deco.func.id == "command":
                try:
                    name, summary = _literal(deco, 0, "name"), _literal(deco, 2, "summary")
                    order = _literal(deco, None, "order", 50)
                except ValueError:
                    raise ValueError(
                        f"{spec.origin}:{deco.lineno}: @command(...) needs its name, summary and order"
                        " written as literals (align --help reads them from the source)"
                    ) from None
                found.append(Declared(name, summary, order, module, node.name, _config_name(deco)))
    return found


@functools.cache
def declared() -> tuple[Declared, ...]:
    """Every command as declared in the source, in ``align --help`` order: by ``order``, then as found."""
    return tuple(sorted((d for module in modules() for d in _declared_in(module)), key=lambda d: d.order))


def load() -> None:
    """Import the command modules (in the order of ``declared``; one already imported is not run again)."""
    for module in dict.fromkeys([*(d.module for d in declared()), *modules()]):
        importlib.import_module(module)


def api() -> dict[str, str]:
    """{Python API name: module}: each command's run function and config class (``align.__getattr__``)."""
    names: dict[str, str] = {}
    for d in declared():
        for name in (d.function, d.config):
            if name and names.setdefault(name, d.module) != d.module:
                raise ValueError(f"two command modules define {name!r}: {names[name]} and {d.module}")
    return names
