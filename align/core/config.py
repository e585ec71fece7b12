"""Typed stage configs: one dataclass per command, parsed from YAML plus ``--flag value`` overrides.

The convention is TRL's (``trl dpo --config x.yaml --learning_rate 1e-5``): the YAML gives
values, flags override them, and each field's ``help`` is the single source for ``--help``,
the generated docs (``docs/configs.md``) and error messages.

Unlike ``cfg.get(key, default)`` (torchtune) or argparse with ``allow_abbrev``, a misspelled
key never falls back silently: unknown keys fail naming the closest valid one, and values are
checked against the field's type before the stage starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from align.core.errors import ConfigError, did_you_mean
from align.core.rank import is_main_process

MISSING = dataclasses.MISSING


def option(default: Any = None, help: str = "", *, choices: Any = None, names: Any = None, **kwargs: Any) -> Any:
    """A config field with its documentation. Lists use ``default_factory`` automatically.

    ``choices=REGISTRY`` (an ``align.core.registry.Registry``): a ``str`` field whose value must be one
    of the registry's names (checked when the config is built; ``--help`` shows them as its type).
    ``names=REGISTRY``: a field whose values are parsed elsewhere but built from the registry's
    names (``rule:NAME``, ``NAME:WEIGHT``); ``--help`` lists those names after the help text.
    Both are read when help is rendered, so names registered later show too.
    """
    metadata = _metadata(help, choices=choices, names=names)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def required(help: str, *, choices: Any = None, names: Any = None) -> Any:
    """A field the user must set (in the YAML or as a flag); ``choices``/``names`` as in ``option``."""
    return dataclasses.field(default=None, metadata=_metadata(help, required=True, choices=choices, names=names))


def _metadata(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **{key: value for key, value in extra.items() if value is not None}}


@dataclasses.dataclass
class BaseConfig:
    """Fields shared by every command. Subclasses add theirs and may override ``validate``."""

    # Name of the field a positional argument fills (``align make-tiny-model DIR``), if any; a
    # tuple names the fields several positionals fill in order (``align import-model SRC OUT``).
    positional: typing.ClassVar[str | tuple[str, ...] | None] = None
    # Fields that steer how a run happens, not what it produces: they are left out of the
    # comparison that decides whether a finished stage dir already holds this result.
    run_control: typing.ClassVar[tuple[str, ...]] = ("overwrite", "resume")
    # Fields naming a folder the command writes into: checked by ``check_output_dir`` at parse time.
    output_dirs: typing.ClassVar[tuple[str, ...]] = ("output_dir",)
    # Fields naming input artifacts (datasets, model folders, ``model:PATH`` scorer specs): the
    # stage's identity covers their content too (``align.core.fingerprint``), not just the string.
    inputs: typing.ClassVar[tuple[str, ...]] = ()
    # List fields that took one string before they took several (rs's model_name_or_path): a
    # one-item list is recorded as that string, so a stage finished before still matches.
    one_or_many: typing.ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        """Cross-field checks; raise ConfigError. Called after every field has its type."""

    def resolved(self) -> dict[str, Any]:
        """The full config as plain JSON-able data (what stage.json records)."""
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The part of the config that determines the stage's result."""
        return {k: self.recorded(k, v) for k, v in self.resolved().items() if k not in self.run_control}

    def recorded(self, name: str, value: Any) -> Any:
        """``value`` of field ``name`` as identities and fingerprints record it (see ``one_or_many``)."""
        if name in self.one_or_many and isinstance(value, list) and len(value) == 1:
            return value[0]
        return value


# ---------------------------------------------------------------------------------------------
# Type coercion: one small function per kind of annotation, looked up in a registry.
# ---------------------------------------------------------------------------------------------

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ValueError


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            as_float = float(text)  # "1e3" is a fine way to write 1000
            if as_float.is_integer():
                return int(as_float)
    raise ValueError


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        result = float(value.strip())
    else:
        raise ValueError
    if math.isnan(result):
        raise ValueError
    return result


def _to_str(value: Any) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError


_SCALARS: dict[Any, tuple[typing.Callable[[Any], Any], str]] = {
    bool: (_to_bool, "a boolean (true/false)"),
    int: (_to_int, "an integer"),
    float: (_to_float, "a number"),
    str: (_to_str, "a string"),
}


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if tp in _SCALARS:
        return _SCALARS[tp][1]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " (or null)"
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(tp: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to annotation ``tp``; ValueError if it can't."""
    origin = get_origin(tp)
    if tp in _SCALARS:
        return _SCALARS[tp][0](value)
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ValueError
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null"}):
            if type(None) in args:
                return None
            raise ValueError
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value)
            except ValueError:
                continue
        raise ValueError
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError
        return [coerce(item, v) for v in value]
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError
    raise TypeError(f"unsupported config annotation {tp!r}")


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def fields_of(cls: type[BaseConfig]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type[BaseConfig]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, valid: list[str], where: str, as_flag: bool) -> ConfigError:
    shown = f"--{key}" if as_flag else f"'{key}'"
    hint = did_you_mean(key, valid, "; did you mean --{}?" if as_flag else "; did you mean {}?")
    return ConfigError(f"unknown {'flag' if as_flag else 'key'} {shown}{where}{hint} (see --help for the valid ones)")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config with ``yaml.safe_load``; it must be a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        loc = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{loc}: {problem}; fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of key: value, got {type(data).__name__}")
    return data


def split_flags(argv: list[str], bool_fields: set[str]) -> tuple[str | None, list[tuple[str, Any]], list[str]]:
    """Split ``argv`` into (config path, [(key, raw value)], positionals).

    ``--key value`` and ``--key=value``; a boolean field given alone (``--overwrite``) means true.
    """
    config_path = None
    pairs: list[tuple[str, Any]] = []
    positionals: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            positionals.append(arg)
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if key in bool_fields and not (has_value and argv[i + 1].lower() in _TRUE | _FALSE):
                value, has_value = "true", False
            elif not has_value:
                raise ConfigError(f"flag --{key} needs a value (--{key} VALUE)")
            else:
                value = argv[i + 1]
            i += 1 if not has_value else 2
        else:
            i += 1
        if key == "config":
            config_path = value
        else:
            pairs.append((key, value))
    return config_path, pairs, positionals


def build_config(cls: type[BaseConfig], values: dict[str, Any], sources: dict[str, str] | None = None) -> BaseConfig:
    """Type-check ``values`` against ``cls`` and construct it. ``sources`` says where each came from."""
    sources = sources or {}
    hints = _hints(cls)
    fields = fields_of(cls)
    kwargs = {}
    for key, raw in values.items():
        if key not in fields:
            raise _unknown_key(key, list(fields), sources.get(key, ""), as_flag=False)
        try:
            kwargs[key] = coerce(hints[key], raw)
        except ValueError:
            where = sources.get(key, "")
            raise ConfigError(f"config key '{key}'{where} expects {_describe(hints[key])}, got {raw!r}") from None
    config = cls(**kwargs)
    for name, f in fields.items():
        choices = f.metadata.get("choices")
        if choices is not None and getattr(config, name) is not None and getattr(config, name) not in choices:
            raise choices.unknown(getattr(config, name))
        if f.metadata.get("required") and getattr(config, name) in (None, ""):
            flag = f"{name.upper()} positional argument or --{name}" if name in _positionals(cls) else f"--{name}"
            raise ConfigError(f"missing required '{name}': set it in the YAML or pass {flag} ({f.metadata['help']})")
    config.validate()
    for name in cls.output_dirs:
        if getattr(config, name, None):
            check_output_dir(getattr(config, name), name, sources.get(name, ""))
    return config


def check_output_dir(value: str, key: str, where: str = "") -> None:
    """Fail before anything is written when ``value`` cannot be, or become, a folder we can write.

    An existing file, a path below a file, and a folder in which no file can be created (read-only
    mounts, permissions, /proc) each give one ConfigError naming the path. The write check creates
    and removes an empty probe folder in the nearest existing ancestor, so nothing is left behind;
    only the main process of a distributed launch probes (it is the one that writes the output, and
    another rank's probe could land inside the folder rank 0 has just made).
    """
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"'{key}'{where}: {path} is an existing file, not a folder; choose another path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"'{key}'{where}: cannot create {path}: {existing} is a file, not a folder; choose another path"
        )
    if not is_main_process():
        return
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".align-write-check-", dir=existing))
    except OSError as err:
        raise ConfigError(
            f"'{key}'{where}: cannot write to {path}: {err.strerror} in {existing}; choose another path"
        ) from None


def _positionals(cls: type[BaseConfig]) -> tuple[str, ...]:
    """The fields positional arguments fill, in order."""
    if cls.positional is None:
        return ()
    return (cls.positional,) if isinstance(cls.positional, str) else tuple(cls.positional)


def parse_config(cls: type[BaseConfig], argv: list[str]) -> BaseConfig:
    """Parse ``[--config FILE.yaml] [POSITIONAL] [--key value ...]`` into ``cls``; flags override the YAML."""
    hints = _hints(cls)
    bool_fields = {name for name, tp in hints.items() if tp is bool}
    config_path, pairs, positionals = split_flags(argv, bool_fields)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    valid = list(fields_of(cls))
    if config_path:
        for key, value in load_yaml(config_path).items():
            if key not in valid:
                raise _unknown_key(str(key), valid, f" in {config_path}", as_flag=False)
            values[key], sources[key] = value, f" (in {config_path})"
    names = _positionals(cls)
    if len(positionals) > len(names):
        raise ConfigError(f"unexpected argument {positionals[-1]!r}; options are passed as --key value")
    for name, value in zip(names, positionals):
        values[name], sources[name] = value, " (positional argument)"
    for key, value in pairs:
        if key not in valid:
            raise _unknown_key(key, valid, "", as_flag=True)
        values[key], sources[key] = value, f" (from --{key})"
    return build_config(cls, values, sources)


# ---------------------------------------------------------------------------------------------
# Documentation: --help and docs/configs.md come from the same fields.
# ---------------------------------------------------------------------------------------------


def field_rows(cls: type[BaseConfig]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) for every field, in declaration order."""
    hints = _hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("required"):
            default = "required"
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = repr(f.default)
        rows.append((f.name, _field_type(f, hints[f.name]), default, _field_help(f)))
    return rows


def _field_type(f: dataclasses.Field, tp: Any) -> str:
    choices = f.metadata.get("choices")
    if choices is None:
        return _describe(tp)
    return (
        "one of "
        + ", ".join(repr(name) for name in choices)
        + (" (or null)" if _describe(tp).endswith("(or null)") else "")
    )


def _field_help(f: dataclasses.Field) -> str:
    text, names = f.metadata.get("help", ""), f.metadata.get("names")
    if names is None:
        return text
    return f"{text} {names.kind[0].upper() + names.kind[1:]} names: {', '.join(names)}."


def help_text(command: str, cls: type[BaseConfig], summary: str) -> str:
    usage = f"usage: align {command} [--config FILE.yaml]"
    for name in _positionals(cls):
        usage += f" {name.upper()}"
    lines = [usage + " [--key value ...]", "", summary, "", "options (YAML keys or --flags; flags win):"]
    for name, tp, default, text in field_rows(cls):
        lines.append(f"  --{name}  ({tp}; default {default})")
        lines.append(f"      {text}")
    lines.append("  --debug\n      show full tracebacks on errors")
    return "\n".join(lines)


def markdown(command: str, cls: type[BaseConfig], summary: str) -> str:
    out = [f"## `align {command}`", "", summary, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for name, tp, default, text in field_rows(cls):
        out.append(f"| `{name}` | {tp} | `{default}` | {text.replace('|', '/')} |")
    return "\n".join(out) + "\n"
