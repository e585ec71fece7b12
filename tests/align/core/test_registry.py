"""align.core.registry: the one registry every pluggable part uses, the registry-backed options' help,
and the layering that keeps align/cli.py on top of the stages."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from align.cli import _load_commands, main
from align.core.config import field_rows, help_text, markdown, parse_config
from align.core.errors import ConfigError
from align.core.registry import COMMANDS, Registry

from conftest import ROOT

_load_commands()


def test_register_both_forms_keep_order_and_reject_duplicates():
    reg: Registry[object] = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    assert reg.register("a", 1) == 1 and b() == "b"  # both forms return what they register
    assert reg.keys() == ["b", "a"] and list(reg) == ["b", "a"] and len(reg) == 2
    assert reg.items() == [("b", b), ("a", 1)] and reg.values() == [b, 1]
    assert reg["a"] == 1 and reg.get("b") is b and "a" in reg and "c" not in reg
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a", 2)
    with pytest.raises(ValueError, match="widget 'b' is already registered"):
        reg.register("b")(lambda: None)
    assert reg["a"] == 1  # the first registration stands


def test_unknown_name_is_one_line_with_a_suggestion_and_every_valid_name():
    reg: Registry[int] = Registry("widget")
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        reg.register(name, i)
    with pytest.raises(ConfigError) as err:
        reg["betta"]
    assert str(err.value) == "unknown widget 'betta' (did you mean 'beta'?); valid: alpha, beta, gamma"
    assert str(reg.unknown("zzz")) == "unknown widget 'zzz'; valid: alpha, beta, gamma"
    with pytest.raises(ConfigError, match="unknown widget None; valid"):
        reg.get(None)


def _registries() -> dict[str, Registry]:
    from align.rl.optimizers import OPTIMIZERS
    from align.stages.dpo import DPO_LOSSES
    from reward.losses import RM_LOSSES
    from reward.rules import RULES
    from reward.scorers import COMBINERS, SCORER_KINDS
    from sampling.base import ENGINES
    from sampling.select import STRATEGIES

    return {
        "commands": COMMANDS,
        "dpo losses": DPO_LOSSES,
        "optimizers": OPTIMIZERS,
        "rules": RULES,
        "reward losses": RM_LOSSES,
        "combiners": COMBINERS,
        "scorer kinds": SCORER_KINDS,
        "engines": ENGINES,
        "strategies": STRATEGIES,
    }


@pytest.mark.parametrize("label", list(_registries()))
def test_every_registry_is_a_registry_with_its_own_misses(label):
    reg = _registries()[label]
    assert isinstance(reg, Registry) and len(reg) >= 2
    first = reg.keys()[0]
    with pytest.raises(ConfigError) as err:
        reg[first + "x"]
    assert str(err.value) == f"unknown {reg.kind} {first + 'x'!r} (did you mean {first!r}?); valid: {', '.join(reg)}"


# The registry-backed options of each command: their --help and docs/configs.md list the
# registry's names, read from the registry when rendered.
BACKED = {
    "rs": {"engine": "choices", "select": "choices", "reward_combine": "choices", "reward": "names"},
    "eval": {"engine": "choices", "reward_combine": "choices", "reward": "names", "judges": "names"},
    "rlhf": {
        "engine": "choices",
        "optimizer": "choices",
        "reward_combine": "choices",
        "reward": "names",
        "eval_reward": "names",
        "monitor_judges": "names",
    },
    "dpo": {"loss": "names", "eval_reward": "names"},
    "rm": {"loss": "choices"},
    "sft": {"eval_reward": "names"},
    "demo-data": {"style": "choices"},
    "merge": {"method": "choices"},
    "distill": {"eval_reward": "names"},
}


def _backed_fields(name: str) -> dict[str, tuple[str, Registry]]:
    out = {}
    for f in dataclasses.fields(COMMANDS[name].config):
        for key in ("choices", "names"):
            if key in f.metadata:
                out[f.name] = (key, f.metadata[key])
    return out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_and_docs_list_every_registry_name(name):
    cmd = COMMANDS[name]
    backed = _backed_fields(name)
    assert {k: kind for k, (kind, _) in backed.items()} == BACKED.get(name, {})
    rows = {row[0]: row for row in field_rows(cmd.config)}
    text, md = help_text(name, cmd.config, cmd.summary), markdown(name, cmd.config, cmd.summary)
    for field, (kind, reg) in backed.items():
        _, tp, _, help_ = rows[field]
        if kind == "choices":
            assert tp == "one of " + ", ".join(repr(k) for k in reg)
            assert f"--{field}  ({tp};" in text and f"| `{field}` | {tp} |" in md
        else:
            listed = f"{reg.kind[0].upper()}{reg.kind[1:]} names: {', '.join(reg)}."
            assert help_.endswith(listed) and listed in text and listed in md


def test_help_reads_the_registry_when_rendered(monkeypatch):
    from reward import rules

    monkeypatch.setattr(rules.RULES, "_items", dict(rules.RULES._items))  # keep the global registry clean
    rules.register_rule("always_one")(lambda prompt, response, **columns: 1.0)
    cmd = COMMANDS["rs"]
    assert "always_one." in help_text("rs", cmd.config, cmd.summary)


REQUIRED = {
    "rs": ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", "--reward", "rule:arithmetic"],
    "rlhf": ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", "--reward", "rule:arithmetic"],
    "rm": ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o"],
}


@pytest.mark.parametrize(
    "name, field", [(n, f) for n in REQUIRED for f, (kind, _) in _backed_fields(n).items() if kind == "choices"]
)
def test_choices_are_checked_when_the_config_is_built(name, field):
    reg = _backed_fields(name)[field][1]
    for key in reg:
        assert getattr(parse_config(COMMANDS[name].config, [*REQUIRED[name], f"--{field}", key]), field) == key
    with pytest.raises(ConfigError) as err:
        parse_config(COMMANDS[name].config, [*REQUIRED[name], f"--{field}", "nonesuch"])
    assert str(err.value) == str(reg.unknown("nonesuch"))


def test_unknown_command(capsys):
    assert main(["sfx"]) == 2
    assert capsys.readouterr().err == f"align: error: {COMMANDS.unknown('sfx')}\n"
    assert "(did you mean 'sft'?)" in str(COMMANDS.unknown("sfx"))


def test_stage_modules_do_not_import_the_cli():
    """align/cli.py sits on top: the modules that register commands never import it."""
    modules = sorted({cmd.run.__module__ for cmd in COMMANDS.values()})
    assert len(modules) >= 7 and "align.cli" not in modules
    code = f"import sys; import {', '.join(modules)}; print(sorted(m for m in sys.modules if m == 'align.cli'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
