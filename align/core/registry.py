"""Name -> object registries, and the registry of ``align`` commands.

One small class serves every pluggable part looked up by name: commands, DPO losses, RL
optimizers, reward rules, reward-model losses, scorer combiners, engines and selection
strategies. A lookup miss is a ``ConfigError`` (exit 2) in one line that names the kind,
suggests the closest valid name and lists them all; ``--help`` and ``docs/configs.md`` list a
registry-backed option's choices from the same registry (``option(..., choices=REGISTRY)``).

This module imports nothing but ``align.core.errors``, so ``sampling/`` and ``reward/`` (which
already import ``align.core.errors`` and ``align.core.config``) use it without importing any stage, and
every stage registers its command here without importing ``align.cli``, which sits on top and
imports the stages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar, overload

from align.core.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects by name, in registration order. ``kind`` names them in errors ("selection strategy")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: Any = dataclasses.MISSING) -> Any:
        """``@REG.register("name")`` above a function or class, or ``REG.register("name", obj)``.
        Returns the object, so decorators stack; a name already taken is a ValueError (a bug)."""
        if obj is dataclasses.MISSING:
            return lambda target: self.register(name, target)
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def unknown(self, name: object) -> ConfigError:
        """The one-line error for a name that is not registered."""
        hint = did_you_mean(str(name), self._items, " (did you mean {!r}?)")
        return ConfigError(f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self._items)}")

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise self.unknown(name) from None

    get = __getitem__

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[str]:
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def values(self) -> list[T]:
        return list(self._items.values())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"


# What a recipe may reference in a stage dir besides ``${NAME.dir}``: ``${NAME.model}``, ``${NAME.data}``.
ARTIFACTS = ("model", "data")


@dataclasses.dataclass(frozen=True)
class Command:
    """``align <name>``: its typed config class, its run function and a one-line summary, plus what
    the rest of the toolkit needs to know about it (all given to ``@command`` in its own module)."""

    name: str
    config: type
    run: Callable[[Any], Any]
    summary: str
    parse: Callable[[type, list[str]], Any] | None = None  # argv -> config; None: align.core.config.parse_config
    # Where ``align --help`` lists it (ties keep the order the modules are found in: align.stages).
    order: int = 50
    # The artifacts its stage dir holds for later stages (``ARTIFACTS``): ``${NAME.model}`` and so on.
    artifacts: tuple[str, ...] = ()
    # True for a command that writes its one artifact straight into output_dir, without the stage
    # contract: ``align run`` points output_dir at <stage dir>/<artifact> and writes stage.json itself.
    wrapped: bool = False
    # Its key metrics in ``align status``: {column: stage.json summary key}, or a function of the summary.
    metrics: Mapping[str, str] | Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # Files and folders in its stage dir beyond those every stage has (``align.core.stage_dir.OWNED``):
    # ``--overwrite`` removes them too.
    owns: tuple[str, ...] = ()

    def key_metrics(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Its key metrics read from a stage.json summary (values may be None: not recorded)."""
        if self.metrics is None:
            return {}
        if callable(self.metrics):
            return self.metrics(summary)
        return {column: summary.get(key) for column, key in self.metrics.items()}


COMMANDS: Registry[Command] = Registry("command")


def command(
    name: str,
    config: type,
    summary: str,
    parse: Callable | None = None,
    *,
    order: int = 50,
    artifacts: tuple[str, ...] = (),
    wrapped: bool = False,
    metrics: Mapping[str, str] | Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    owns: tuple[str, ...] = (),
) -> Callable:
    """Register ``fn(config)`` as ``align <name>`` (a decorator); returns ``fn`` unchanged.

    ``parse(config_class, argv)`` replaces the standard ``--config FILE --key value`` parser where a
    command takes other arguments (``align run``'s repeatable ``--set``). The other keywords are the
    ``Command`` fields; ``name``, ``summary`` and ``order`` are literals, read from the source by
    ``align --help`` (``align.stages.declared``) without importing the module."""
    unknown = [a for a in artifacts if a not in ARTIFACTS]
    if unknown or (wrapped and len(artifacts) != 1):
        raise ValueError(
            f"command {name!r}: artifacts must be some of {ARTIFACTS} (exactly one when wrapped), got {artifacts}"
        )

    def register(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        COMMANDS.register(
            name, Command(name, config, fn, summary, parse, order, tuple(artifacts), wrapped, metrics, tuple(owns))
        )
        return fn

    return register


__all__ = ["ARTIFACTS", "COMMANDS", "Command", "Registry", "command"]
