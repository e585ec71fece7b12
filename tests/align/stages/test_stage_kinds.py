"""A stage kind is one module: its ``@command(...)`` is all that the CLI, the recipes, ``align status``
and the Python API read about it (align.core.registry, align.stages)."""

from __future__ import annotations

import pytest

from align.cli import _load_commands
from align.core.registry import ARTIFACTS, COMMANDS, Command, command
from align.pipeline.status import key_metrics

_load_commands()

# One summary with every key a built-in kind reads; each kind's key metrics, in their column order.
SUMMARY = {
    "eval_mean_reward": 0.5,
    "eval_accuracy": 0.7,
    "eval_accuracy_noise_free": 0.8,
    "kept_rows": 10,
    "mean_reward": 0.6,
    "wins": {"/w/sft/model": 3, "/w/dpo/model": 1},
    "reward_last_10pct": 0.4,
    "monitor_kl": 1.5,
    "heldout_kl": 0.2,
    "chosen": "dpo",
    "metric": "eval_mean_reward",
    "judge_means": {"rule:vader": 0.1, "model:runs/x/rm/model": 0.3},
    "reference_nll": 2.0,
    "mean_length": 12.0,
    "distinct_2": 0.9,
}
KEY_METRICS = {
    "sft": {"held_out": 0.5},
    "dpo": {"held_out": 0.5},
    "eval": {"held_out": 0.6, "vader": 0.1, "rm": 0.3, "length": 12.0, "distinct_2": 0.9, "ref_nll": 2.0},
    "rm": {"eval_accuracy": 0.7, "noise_free": 0.8},
    "rs": {"kept_rows": 10, "mean_reward": 0.6, "wins": "sft/model 3, dpo/model 1"},
    "rlhf": {"held_out": 0.5, "train_reward": 0.4, "monitor_kl": 1.5},
    "distill": {"held_out": 0.5, "heldout_kl": 0.2},
    "select": {"chosen": "dpo", "chosen_value": 0.5},
}


@pytest.mark.parametrize("kind", list(COMMANDS))
def test_key_metrics_of_every_kind(kind):
    found = key_metrics(kind, {"summary": SUMMARY})
    assert list(found.items()) == list(KEY_METRICS.get(kind, {}).items())
    assert key_metrics(kind, {"summary": {}}) == {} and key_metrics(kind, None) == {}


def test_key_metrics_leave_out_what_was_not_recorded_and_unknown_kinds():
    assert key_metrics("eval", {"summary": {"mean_reward": 0.25}}) == {"held_out": 0.25}
    assert key_metrics("rs", {"summary": {"kept_rows": 3, "wins": {"/w/sft/model": 3}}}) == {"kept_rows": 3}
    assert key_metrics("no-such-kind", {"summary": SUMMARY}) == {}


def test_declared_artifacts_and_wrapped_kinds():
    from align.pipeline.plan import stage_kinds, wrapped

    assert {name: wrapped(name) for name in stage_kinds() if wrapped(name)} == {
        "make-tiny-model": "model",
        "demo-data": "data",
        "situation-prompts": "data",
        "import-model": "model",
    }
    for name, cmd in COMMANDS.items():
        assert set(cmd.artifacts) <= set(ARTIFACTS), name
    assert COMMANDS["rs"].artifacts == ("data",) and COMMANDS["eval"].artifacts == ()


def test_command_checks_its_declaration():
    for artifacts, wrapped in ((("weights",), False), (("model", "data"), True), ((), True)):
        with pytest.raises(ValueError, match="artifacts must be some of"):
            command("x", object, "x", artifacts=artifacts, wrapped=wrapped)
    assert Command("x", object, print, "x", metrics={"a": "b"}).key_metrics({"b": 1}) == {"a": 1}
    assert Command("x", object, print, "x", metrics=lambda s: {"n": len(s)}).key_metrics({"b": 1}) == {"n": 1}
    assert Command("x", object, print, "x").key_metrics({"b": 1}) == {}


def test_python_api_has_every_command_and_the_recipe_api():
    """Each registered command's run function and config class, by the names its module gives them."""
    import align

    names = align.__all__
    for name, cmd in COMMANDS.items():
        for obj in (cmd.run, cmd.config):
            assert obj.__name__ in names and getattr(align, obj.__name__) is obj, (name, obj.__name__)
    from align.pipeline.recipe import Recipe
    from align.pipeline.status import workdir_status, write_report

    assert (align.Recipe, align.workdir_status, align.write_report) == (Recipe, workdir_status, write_report)
    for name in (
        "run_merge",
        "MergeConfig",
        "run_distill",
        "DistillConfig",
        "run_recipe",
        "RunConfig",
        "make_tiny_model",
    ):
        assert name in names and name in dir(align)
    assert len(set(names)) == len(names)
    with pytest.raises(AttributeError, match="no attribute 'run_nothing'"):
        align.run_nothing  # noqa: B018 - the attribute lookup is what must raise


# A stage kind of its own, as a plugin package would ship it: one module, and an entry point in the
# ``align.stages`` group that names it (in a pyproject.toml: [project.entry-points."align.stages"]).
PLUGIN = '''
"""align echo-words: write a word several times (a stage kind outside the toolkit)."""

import dataclasses

from align.core.config import BaseConfig, option, required
from align.core.registry import command
from align.core.stage_dir import Stage, read_stage


@dataclasses.dataclass
class EchoWordsConfig(BaseConfig):
    run_control = ("overwrite",)

    output_dir: str = required("Stage directory: data/words.txt and tally.txt.")
    word: str = option("hello", "The word to write.")
    times: int = option(2, "How many times.")
    overwrite: bool = option(False, "Replace a finished stage in output_dir.")


@command("echo-words", EchoWordsConfig, "Write a word several times (a stage kind from a plugin).",
         artifacts=("data",), metrics={"words": "words"}, owns=("tally.txt",))
def run_echo_words(cfg: EchoWordsConfig) -> dict:
    stage = Stage("echo-words", cfg, cfg.output_dir)
    if not stage.prepare(overwrite=cfg.overwrite):
        return read_stage(cfg.output_dir)
    (stage.dir / "data").mkdir()
    (stage.dir / "data" / "words.txt").write_text((cfg.word + "\\n") * cfg.times)
    (stage.dir / "tally.txt").write_text(str(cfg.times))
    return stage.finish({"words": cfg.times}, {"data": str(stage.dir / "data")})
'''

RECIPE = """\
stages:
  - {name: first, kind: echo-words, word: hi, times: 3}
  - {name: second, kind: echo-words, word: "${first.data}", times: "${first.summary.words}"}
"""

IN_PROCESS = """\
import json
import align
from align.cli import _load_commands, declared_commands, main
from align.core.registry import COMMANDS
from align.core.stage_dir import owned

_load_commands()
print(json.dumps({"api": [align.run_echo_words.__module__, "run_echo_words" in align.__all__, "EchoWordsConfig" in align.__all__],
                  "owned": "tally.txt" in owned(), "order": [name for name, _ in declared_commands()] == list(COMMANDS)}))
main(["status", "w"])
"""


def test_a_stage_kind_from_one_module(tmp_path):
    """A new kind written as one module and an entry point, no other file touched: it is in `align
    --help`, runs in `align run` (its artifact and summary referenced by a later stage), shows its key
    metric in `align status` and is in the Python API."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    site = tmp_path / "site"
    (site / "align_echo_words-0.1.dist-info").mkdir(parents=True)
    (site / "align_echo_words-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: align-echo-words\nVersion: 0.1\n"
    )
    (site / "align_echo_words-0.1.dist-info" / "entry_points.txt").write_text(
        "[align.stages]\necho-words = echo_words\n"
    )
    (site / "echo_words.py").write_text(PLUGIN)
    (tmp_path / "r.yaml").write_text(RECIPE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
        "COLUMNS": "200",
        "ALIGN_FINGERPRINT_CACHE": str(tmp_path / "fp.json"),
    }

    def align(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
        )

    shown = align("-m", "align", "--help")
    assert shown.returncode == 0, shown.stderr
    listed = [line.split()[0] for line in shown.stdout.splitlines() if line.startswith("  ")]
    assert listed[listed.index("select") : listed.index("run") + 1] == ["select", "echo-words", "run"]
    assert "  echo-words         Write a word several times (a stage kind from a plugin)." in shown.stdout

    ran = align("-m", "align", "run", "r.yaml", "--workdir", "w")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert (tmp_path / "w" / "first" / "data" / "words.txt").read_text() == "hi\n" * 3
    assert (tmp_path / "w" / "second" / "data" / "words.txt").read_text() == "w/first/data\n" * 3  # ${first.data}
    assert ran.stdout.count("words 3") == 2  # the status table after the run

    checked = align("-c", IN_PROCESS)
    assert checked.returncode == 0, checked.stderr
    facts = json.loads(checked.stdout.splitlines()[0])
    assert facts == {"api": ["echo_words", True, True], "owned": True, "order": True}
    rows = [line.split("\u2502")[1:5] for line in checked.stdout.splitlines() if "echo-words" in line]
    assert [[cell.strip() for cell in row] for row in rows] == [
        ["first", "echo-words", "done", "words 3"],
        ["second", "echo-words", "done", "words 3"],
    ]


def test_a_declaration_help_cannot_read_is_named(tmp_path, monkeypatch):
    from align.stages import _declared_in

    (tmp_path / "odd_stage.py").write_text(
        'NAME = "odd"\n\n\n@command(NAME, object, "An odd one.")\ndef run_odd(cfg):\n    pass\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ValueError, match=r"odd_stage.py:4: @command\(...\) needs its name, summary and order written as literals"
    ):
        _declared_in("odd_stage")
