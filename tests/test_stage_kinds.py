"""A stage kind is one module: its ``@command(...)`` is all that the CLI, the recipes, ``align status``
and the Python API read about it (align.registry, align.stages)."""

from __future__ import annotations

import pytest

from align.cli import _load_commands
from align.registry import ARTIFACTS, COMMANDS, Command, command
from align.status import key_metrics

_load_commands()

# One summary with every key a built-in kind reads; each kind's key metrics, in their column order.
SUMMARY = {
    "eval_mean_reward": 0.5, "eval_accuracy": 0.7, "eval_accuracy_noise_free": 0.8, "kept_rows": 10, "mean_reward": 0.6,
    "wins": {"/w/sft/model": 3, "/w/dpo/model": 1}, "reward_last_10pct": 0.4, "monitor_kl": 1.5, "heldout_kl": 0.2,
    "chosen": "dpo", "metric": "eval_mean_reward", "judge_means": {"rule:vader": 0.1, "model:runs/x/rm/model": 0.3},
    "reference_nll": 2.0, "mean_length": 12.0, "distinct_2": 0.9,
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
    from align.pipeline import stage_kinds, wrapped

    assert {name: wrapped(name) for name in stage_kinds() if wrapped(name)} == {
        "make-tiny-model": "model", "demo-data": "data", "situation-prompts": "data", "import-model": "model"}
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
    from align.recipe import Recipe
    from align.status import workdir_status, write_report

    assert (align.Recipe, align.workdir_status, align.write_report) == (Recipe, workdir_status, write_report)
    for name in ("run_merge", "MergeConfig", "run_distill", "DistillStageConfig", "run_recipe", "RunConfig", "make_tiny_model"):
        assert name in names and name in dir(align)
    assert len(set(names)) == len(names)
    with pytest.raises(AttributeError, match="no attribute 'run_nothing'"):
        align.run_nothing
