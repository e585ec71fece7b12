"""Recipes read as pipelines: one YAML file describes a whole post-training pipeline; ``Pipeline``
reads, expands and validates it and plans what ``align run`` does. ``align.pipeline.runner`` runs the plan;
``align.pipeline.recipe.Recipe`` is the Python API on top (a ``Pipeline`` that also runs and reports).

The syntax is documented in docs/recipes.md. In short::

    workdir: runs/quickstart          # default; --workdir overrides
    vars: {steps: 900}                # ${vars.steps}
    profiles:                         # --profile tiny: overlays on vars, workdir and stage keys
      tiny: {vars: {steps: 20}, stages: {rs: {max_prompts: 16}}}
    stages:
      - {name: demo, kind: demo-data}
      - {name: tiny, kind: make-tiny-model}
      - name: sft
        kind: sft
        config: ../demo_sft.yaml      # optional base config, relative to this file
        model_name_or_path: ${tiny.model}
        dataset: ${demo.data}/sft.jsonl
        max_steps: ${vars.steps}
      - repeat: 2                     # rounds: dpo_r1, dpo_r2
        stages:
          - name: dpo
            kind: dpo
            model_name_or_path: ${prev.dpo.model|sft.model}   # round 1 falls back to sft
            ref_model: ${sft.model}

Every stage lands in ``<workdir>/<name>`` (rounds: ``<name>_r<k>``) under the stage contract
(``align.core.stage_dir``); the runner sets ``output_dir``. ``${X.model}``, ``${X.data}`` and ``${X.dir}``
are paths known before anything runs; ``${X.summary.KEY}`` is read from X's stage.json just
before the stage that uses it runs. The whole recipe, every stage through its own typed config
(``align.core.config.build_config``), is validated before any work starts.

Unlike the shell loops of RLHFlow's ``run_loop.sh`` or OpenRLHF's iterative DPO script (see
docs/recipes.md), a rerun skips every stage whose identity (config plus input fingerprints,
``align.core.stage_dir.stage_state``) is unchanged, and reruns the stages that consume a rerun's output.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from align import stages
from align.core.config import BaseConfig, build_config, fields_of, load_yaml
from align.core.errors import ConfigError, did_you_mean
from align.core.registry import COMMANDS, Command, Registry
from align.core.stage_dir import read_stage, stage_state

REF = re.compile(r"\$\{([^}]*)\}")
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
TOP_KEYS = ("workdir", "vars", "profiles", "stages", "description")
PROFILE_KEYS = ("workdir", "vars", "stages")
RESERVED = ("vars", "prev", "round")
# Keys of a stage entry that are the runner's, not the stage config's.
ENTRY_KEYS = ("name", "kind", "config", "profiles")
# Attributes of a stage reference and the path each names inside the stage dir.
PATH_ATTRS = {"model": "model", "data": "data", "dir": ""}
SET_BY_RUNNER = ("output_dir", "overwrite", "resume")
_HINT = "; did you mean '{}'?"  # how a recipe error suggests the closest name


def commands() -> Registry[Command]:
    """The command registry with every stage command in it (``align.stages.load``)."""
    stages.load()
    return COMMANDS


def wrapped(kind: str) -> str | None:
    """The artifact a ``wrapped`` kind writes straight into output_dir (no stage contract of its own:
    the runner points output_dir at <stage dir>/<artifact> and writes the stage.json itself); None
    for the kinds that write a stage dir."""
    cmd = commands()[kind]
    return cmd.artifacts[0] if cmd.wrapped else None


def stage_kinds() -> list[str]:
    """Every registered command that writes a stage dir (has ``output_dir``): what ``kind`` may be."""
    return sorted(name for name, cmd in commands().items() if "output_dir" in fields_of(cmd.config))


@dataclasses.dataclass
class StageSpec:
    """One stage of a recipe, rounds expanded: ``name`` is its folder (``dpo_r2``), ``base`` its recipe name."""

    name: str
    base: str
    kind: str
    values: dict[str, Any]
    round: int | None = None
    block: int | None = None  # index of its repeat block, if any
    rounds: int = 0  # rounds of that block

    @property
    def label(self) -> str:
        return f"stage '{self.name}'"


@dataclasses.dataclass
class Ref:
    """A parsed ``${...}``: a value (vars, round) or a stage attribute."""

    text: str
    stage: str | None = None  # resolved folder name of the stage referred to
    attr: str = ""  # model, data, dir or summary.KEY
    value: Any = None  # for vars and round


class Pipeline:
    """A loaded, validated recipe. ``Pipeline.load(path, profile=, sets=, workdir=)``; see docs/recipes.md."""

    def __init__(self, path: Path, data: dict[str, Any], profile: str | None, sets: list[str], workdir: str | None):
        self.path = path
        self.profile = profile
        self.sets = list(sets)
        data = _apply_profile(copy.deepcopy(data), profile, path)
        self._profile_overrides = data.pop("_overrides", [])
        self.vars: dict[str, Any] = dict(data.get("vars") or {})
        _apply_var_sets(self.vars, self.sets)  # before expanding: 'repeat: ${vars.rounds}' reads them
        self.stages = _expand(data.get("stages"), path, self.vars, profile)
        _apply_sets(self, self.sets)
        self.workdir = Path(workdir or data.get("workdir") or Path("runs") / path.stem)
        self.by_name = {s.name: s for s in self.stages}
        self.refs = {s.name: _parse_refs(self, s) for s in self.stages}
        for spec in self.stages:
            self._validate(spec)

    @classmethod
    def load(
        cls,
        path: str | Path,
        profile: str | None = None,
        sets: list[str] | tuple[str, ...] = (),
        workdir: str | None = None,
    ) -> "Pipeline":
        path = Path(path)
        return cls(path, _read(path), profile, list(sets), workdir)

    # -- paths and references -------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        return self.workdir / name

    def deps(self, name: str) -> list[str]:
        """The stages whose artifacts stage ``name`` uses, in recipe order."""
        used = {ref.stage for refs in self.refs[name].values() for ref in refs if ref.stage}
        return [s.name for s in self.stages if s.name in used]

    def consumers(self, name: str) -> list[str]:
        return [s.name for s in self.stages if name in self.deps(s.name)]

    def _ref_value(self, ref: Ref, dynamic: bool) -> Any:
        if ref.stage is None:
            return ref.value
        if ref.attr in PATH_ATTRS:
            sub = PATH_ATTRS[ref.attr]
            return str(self.stage_dir(ref.stage) / sub) if sub else str(self.stage_dir(ref.stage))
        if not dynamic:
            raise _Unresolved(ref.text)
        record = read_stage(self.stage_dir(ref.stage))
        value: Any = record or {}
        for part in ref.attr.split("."):
            if not isinstance(value, dict) or part not in value:
                raise _Unresolved(ref.text)
            value = value[part]
        return value

    def values(self, name: str, dynamic: bool = True) -> dict[str, Any]:
        """Stage ``name``'s config values with references substituted and output_dir set.

        Raises ``_Unresolved`` when a ``${X.summary...}`` value is not available (yet)."""
        spec = self.by_name[name]
        out = {
            key: self._substitute(value, self.refs[name].get(key, []), dynamic) for key, value in spec.values.items()
        }
        artifact = wrapped(spec.kind)
        out["output_dir"] = str(self.stage_dir(name) / artifact) if artifact else str(self.stage_dir(name))
        return out

    def _substitute(self, value: Any, refs: list[Ref], dynamic: bool) -> Any:
        if isinstance(value, list):
            return [self._substitute(v, refs, dynamic) for v in value]
        if isinstance(value, dict):
            return {k: self._substitute(v, refs, dynamic) for k, v in value.items()}
        if not isinstance(value, str) or "${" not in value:
            return value
        lookup = {r.text: r for r in refs}
        whole = REF.fullmatch(value.strip())
        if whole:
            return self._ref_value(lookup[whole.group(1).strip()], dynamic)
        return REF.sub(lambda m: str(self._ref_value(lookup[m.group(1).strip()], dynamic)), value)

    def config(self, name: str) -> BaseConfig:
        """The typed config of stage ``name`` as it would run now (summary values read from disk)."""
        spec = self.by_name[name]
        return build_config(commands()[spec.kind].config, self.values(name), _sources(self, spec))

    def _validate(self, spec: StageSpec) -> None:
        cls = commands()[spec.kind].config
        try:
            values = self.values(spec.name, dynamic=False)
        except _Unresolved:
            values = self._static_values(spec, cls)
        try:
            build_config(cls, values, _sources(self, spec))
        except ConfigError as err:
            raise ConfigError(f"{self.path}: {spec.label}: {err}") from None

    def _static_values(self, spec: StageSpec, cls: type[BaseConfig]) -> dict[str, Any]:
        """Values for validation when some come from an earlier stage's stage.json: those keys are
        checked when the stage runs (left out here unless required, then a placeholder)."""
        fields = fields_of(cls)
        out = {}
        for key, value in spec.values.items():
            try:
                out[key] = self._substitute(value, self.refs[spec.name].get(key, []), dynamic=False)
            except _Unresolved:
                if key in fields and fields[key].metadata.get("required"):
                    out[key] = "0"
        out["output_dir"] = str(self.stage_dir(spec.name))
        return out

    # -- planning ---------------------------------------------------------------------------------
    def decide(self, name: str, rerun: set[str], force: set[str]) -> dict[str, Any]:
        """What ``align run`` does with stage ``name`` given the stages that (will) rerun before it.

        Returns {name, kind, round, dir, state, detail, action, reason}; action is one of
        skip, run (new), resume (incomplete) or overwrite."""
        spec = self.by_name[name]
        upstream = [d for d in self.deps(name) if d in rerun]
        row = {"name": name, "kind": spec.kind, "round": spec.round, "dir": str(self.stage_dir(name))}
        try:
            config = self.config(name)
            state, detail = stage_state(spec.kind, config, self.stage_dir(name))
        except _Unresolved as missing:
            if not upstream:
                raise ConfigError(
                    f"{self.path}: {spec.label}: ${{{missing}}} has no value (is that stage finished?)"
                ) from None
            state, detail = "pending", f"needs ${{{missing}}}"
        forced = name in force or spec.base in force
        if forced:
            action, reason = "overwrite" if state != "new" else "run", "forced (--force)"
        elif upstream and state != "new":
            action, reason = "overwrite", f"upstream {', '.join(upstream)} rerun{'s' if len(upstream) == 1 else ''}"
        else:
            action, reason = _ACTIONS[state], _REASONS[state] + (f": {detail}" if detail else "")
        return {**row, "state": state, "detail": detail, "action": action, "reason": reason}

    def plan(self, force: list[str] | tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """The dry-run plan: one ``decide`` row per stage, in order."""
        force_set = self._check_force(force)
        rerun: set[str] = set()
        rows = []
        for spec in self.stages:
            row = self.decide(spec.name, rerun, force_set)
            if row["action"] != "skip":
                rerun.add(spec.name)
            rows.append(row)
        return rows

    def _check_force(self, force: list[str] | tuple[str, ...]) -> set[str]:
        known = {s.name for s in self.stages} | {s.base for s in self.stages}
        for name in force:
            if name not in known:
                raise ConfigError(f"--force {name}: no such stage in {self.path}{did_you_mean(name, known, _HINT)}")
        return set(force)

    def set(self, key: str, value: Any) -> "Pipeline":
        """A copy with ``NAME.key`` (or ``vars.x``) set to ``value``, validated like ``--set``."""
        raw = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        return type(self)(self.path, _read(self.path), self.profile, [*self.sets, f"{key}={raw}"], str(self.workdir))


class _Unresolved(Exception):
    """A ``${X.summary...}`` whose stage.json (or key) is not there yet."""


_ACTIONS = {
    "new": "run",
    "up_to_date": "skip",
    "config_changed": "overwrite",
    "input_changed": "overwrite",
    "output_changed": "overwrite",
    "incomplete": "resume",
}
_REASONS = {
    "new": "new",
    "up_to_date": "up to date",
    "config_changed": "config changed",
    "input_changed": "input changed",
    "output_changed": "output changed",
    "incomplete": "incomplete, resumes",
}


# ---------------------------------------------------------------------------------------------
# Reading and expanding the file
# ---------------------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    data = load_yaml(path)  # YAML syntax errors come back with their line
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key '{unknown[0]}'{did_you_mean(unknown[0], TOP_KEYS, _HINT)}"
            f" (valid: {', '.join(TOP_KEYS)})"
        )
    if not isinstance(data.get("stages"), list) or not data["stages"]:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list of stages (each with name and kind)")
    if data.get("vars") is not None and not isinstance(data["vars"], dict):
        raise ConfigError(f"{path}: 'vars' must be a mapping of name: value")
    return data


def _apply_profile(data: dict[str, Any], profile: str | None, path: Path) -> dict[str, Any]:
    profiles = data.get("profiles") or {}
    if profile is None:
        return data
    if profile not in profiles:
        raise ConfigError(
            f"--profile {profile}: {path} has no such profile (defined: {', '.join(profiles) or 'none'})"
        )
    overlay = profiles[profile] or {}
    unknown = [k for k in overlay if k not in PROFILE_KEYS]
    if unknown:
        raise ConfigError(
            f"{path}: profile '{profile}': unknown key '{unknown[0]}' (valid: {', '.join(PROFILE_KEYS)})"
        )
    if "workdir" in overlay:
        data["workdir"] = overlay["workdir"]
    data["vars"] = {**(data.get("vars") or {}), **(overlay.get("vars") or {})}
    data["_overrides"] = [(name, keys, f"profile '{profile}'") for name, keys in (overlay.get("stages") or {}).items()]
    return data


def _expand(entries: list[Any], path: Path, variables: dict[str, Any], profile: str | None) -> list[StageSpec]:
    """Stage entries and repeat blocks -> StageSpecs in run order, with base configs merged; an entry
    with ``profiles: [...]`` exists only under one of those profiles."""
    out: list[StageSpec] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: stages[{i}] must be a mapping with name and kind")
        if not _in_profile(entry, profile, path, f"stages[{i}]"):
            continue
        if "repeat" in entry:
            rounds, inner = _rounds(entry.get("repeat"), variables, path, i), entry.get("stages")
            extra = [k for k in entry if k not in ("repeat", "stages", "profiles")]
            if (
                not isinstance(rounds, int)
                or isinstance(rounds, bool)
                or rounds < 1
                or not isinstance(inner, list)
                or extra
            ):
                raise ConfigError(
                    f"{path}: stages[{i}]: a repeat block is 'repeat: N' (N >= 1, or ${{vars.NAME}})"
                    " and 'stages: [...]' only"
                )
            for r in range(1, rounds + 1):
                for j, sub in enumerate(inner):
                    if not _in_profile(sub, profile, path, f"stages[{i}].stages[{j}]"):
                        continue
                    spec = _entry(sub, path, f"stages[{i}].stages[{j}]")
                    out.append(dataclasses.replace(spec, name=f"{spec.base}_r{r}", round=r, block=i, rounds=rounds))
        else:
            out.append(_entry(entry, path, f"stages[{i}]"))
    seen: set[str] = set()
    for spec in out:
        if spec.name in seen:
            raise ConfigError(f"{path}: two stages are named '{spec.name}'; stage names must be unique")
        seen.add(spec.name)
    return out


def _in_profile(entry: Any, profile: str | None, path: Path, where: str) -> bool:
    """False for an entry whose ``profiles`` list does not name the active profile."""
    if not isinstance(entry, dict) or "profiles" not in entry:
        return True
    names = entry["profiles"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{path}: {where}: 'profiles' must be a non-empty list of profile names (e.g. [tiny])")
    return profile in names


def _rounds(value: Any, variables: dict[str, Any], path: Path, i: int) -> Any:
    """``repeat: N`` or ``repeat: ${vars.NAME}`` (the var after the profile and ``--set vars.NAME=``)."""
    whole = REF.fullmatch(value.strip()) if isinstance(value, str) else None
    if whole and whole.group(1).strip().startswith("vars."):
        name = whole.group(1).strip().removeprefix("vars.")
        if name not in variables:
            raise ConfigError(f"{path}: stages[{i}]: repeat: ${{vars.{name}}} is not defined in vars")
        return variables[name]
    return value


def _apply_var_sets(variables: dict[str, Any], sets: list[str]) -> None:
    """The ``--set vars.NAME=value`` items, applied early (the rest go through _apply_sets)."""
    for item in sets:
        target, eq, raw = item.partition("=")
        if eq and target.startswith("vars.") and len(target) > len("vars."):
            try:
                variables[target.removeprefix("vars.")] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                variables[target.removeprefix("vars.")] = raw


def _entry(entry: Any, path: Path, where: str) -> StageSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: {where} must be a mapping with name and kind")
    name, kind = entry.get("name"), entry.get("kind")
    if not isinstance(name, str) or not NAME.match(name) or name in RESERVED:
        raise ConfigError(
            f"{path}: {where}: 'name' must be a word (letters, digits, _ or -; not {', '.join(RESERVED)}),"
            f" got {name!r}"
        )
    valid = stage_kinds()
    if kind not in valid:
        raise ConfigError(
            f"{path}: stage '{name}': unknown kind {kind!r}{did_you_mean(str(kind), valid, _HINT)}"
            f" (valid: {', '.join(valid)})"
        )
    values: dict[str, Any] = {}
    if entry.get("config") is not None:
        base = Path(entry["config"])
        base = base if base.is_absolute() or base.exists() else path.parent / base
        values.update(load_yaml(base))
    for key, value in entry.items():
        if key in ENTRY_KEYS:
            continue
        if key in SET_BY_RUNNER:
            raise ConfigError(
                f"{path}: stage '{name}': '{key}' is set by align run (the stage dir is <workdir>/{name}); remove it"
            )
        values[key] = value
    return StageSpec(name=name, base=name, kind=kind, values=values)


def _apply_sets(recipe: Pipeline, sets: list[str]) -> None:
    """Profile overlays, then ``--set NAME.key=value`` (NAME: a stage, its base name, or vars)."""
    overrides = list(getattr(recipe, "_profile_overrides", []))
    for item in sets:
        target, eq, raw = item.partition("=")
        name, dot, key = target.partition(".")
        if not eq or not dot or not key:
            raise ConfigError(f"--set {item}: expected NAME.key=value (e.g. sft.max_steps=100 or vars.steps=100)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        overrides.append((name, {key: value}, f"--set {item}"))
    for name, keys, source in overrides:
        if name == "vars":
            recipe.vars.update(keys)
            continue
        matched = [s for s in recipe.stages if name in (s.name, s.base)]
        if not matched:
            known = sorted({s.name for s in recipe.stages} | {s.base for s in recipe.stages})
            raise ConfigError(f"{source}: no stage named '{name}' in {recipe.path}{did_you_mean(name, known, _HINT)}")
        if not isinstance(keys, dict):
            raise ConfigError(f"{source}: stage '{name}' needs a mapping of key: value")
        for spec in matched:
            for key in keys:
                if key in SET_BY_RUNNER:
                    raise ConfigError(f"{source}: '{key}' is set by align run; it cannot be overridden")
            spec.values.update(copy.deepcopy(keys))


def _sources(recipe: Pipeline, spec: StageSpec) -> dict[str, str]:
    return {key: f" (stage '{spec.name}' in {recipe.path})" for key in [*spec.values, "output_dir"]}


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def _parse_refs(recipe: Pipeline, spec: StageSpec) -> dict[str, list[Ref]]:
    """{key: [Ref]} for every ``${...}`` in the stage's values; errors name the stage and key."""
    found: dict[str, list[Ref]] = {}
    for key, value in spec.values.items():
        for text in _ref_texts(value):
            try:
                found.setdefault(key, []).append(_resolve(recipe, spec, text))
            except ConfigError as err:
                raise ConfigError(f"{recipe.path}: {spec.label}, key '{key}': {err}") from None
    return found


def _ref_texts(value: Any) -> list[str]:
    if isinstance(value, list):
        return [t for v in value for t in _ref_texts(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _ref_texts(v)]
    if isinstance(value, str):
        return [m.group(1).strip() for m in REF.finditer(value)]
    return []


def _resolve(recipe: Pipeline, spec: StageSpec, text: str) -> Ref:
    """Parse one ``${...}``: the first alternative (``a|b``) that exists wins."""
    errors = []
    for alt in [a.strip() for a in text.split("|")]:
        try:
            return dataclasses.replace(_resolve_one(recipe, spec, alt), text=text)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(errors[0] if len(errors) == 1 else " and ".join(errors))


def _resolve_one(recipe: Pipeline, spec: StageSpec, text: str) -> Ref:
    if text == "round":
        if spec.round is None:
            raise ConfigError("${round} is only defined inside a repeat block")
        return Ref(text, value=spec.round)
    head, _, rest = text.partition(".")
    if head == "vars":
        if rest not in recipe.vars:
            raise ConfigError(
                f"${{{text}}}: no var '{rest}'{did_you_mean(rest, recipe.vars, _HINT)}"
                f" (defined: {', '.join(recipe.vars) or 'none'})"
            )
        return Ref(text, value=recipe.vars[rest])
    previous = head == "prev"
    if previous:
        head, _, rest = rest.partition(".")
    attr = rest
    if attr not in PATH_ATTRS and not attr.startswith("summary."):
        raise ConfigError(f"${{{text}}}: unknown attribute '{attr}' (use model, data, dir or summary.KEY)")
    return Ref(text, stage=_target(recipe, spec, head, previous, text), attr=attr)


def _target(recipe: Pipeline, spec: StageSpec, name: str, previous: bool, text: str) -> str:
    """The folder name a stage reference in ``spec`` points at (module docstring, docs/recipes.md)."""
    order = [s.name for s in recipe.stages]
    here = order.index(spec.name)
    same_block = [s for s in recipe.stages if s.block is not None and s.block == spec.block and s.base == name]
    if previous:
        if spec.round is None or not same_block:
            raise ConfigError(f"${{{text}}}: 'prev.' refers to an earlier round of a stage in the same repeat block")
        if spec.round == 1:
            raise ConfigError(
                f"${{{text}}} has no previous round in round 1 (add a fallback: ${{prev.{name}...|STAGE...}})"
            )
        return f"{name}_r{spec.round - 1}"
    if same_block:
        target = f"{name}_r{spec.round}"
    elif name in recipe.by_name:
        target = name
    else:
        rounds = [s for s in recipe.stages if s.base == name and s.round is not None]
        if not rounds:
            raise ConfigError(f"${{{text}}}: no stage named '{name}'{did_you_mean(name, order, _HINT)}")
        target = f"{name}_r{max(s.round for s in rounds)}"
    if order.index(target) >= here:
        raise ConfigError(
            f"${{{text}}}: stage '{target}' comes later (or is this stage); a stage can only use earlier ones"
        )
    return target
