"""The shipped recipes (configs/recipes/*.yaml): each loads, validates and plans in every profile
(the real-scale one included: Hub ids are only checked for their form), and the tiny profiles of
the report recipes run end to end on a test budget. Also the two recipe features they use: stage
entries limited to profiles (``profiles: [tiny]``) and ``repeat: ${vars.NAME}``."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from align.core.errors import ConfigError
from align.core.gguf import _HUB_ID
from align.pipeline.recipe import Recipe

from conftest import ALIGN, ROOT

RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
REPORT_RECIPES = {"qwen2", "llama3", "gemma2", "afm"}


def profiles_of(path: Path) -> list[str | None]:
    import yaml

    return [None, *(yaml.safe_load(path.read_text()).get("profiles") or {})]


CASES = [
    pytest.param(path, profile, id=f"{path.stem}-{profile or 'default'}")
    for path in RECIPES
    for profile in profiles_of(path)
]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_FINGERPRINT_CACHE", str(tmp_path / "fp-cache.json"))


def test_the_report_recipes_are_shipped():
    assert REPORT_RECIPES <= {p.stem for p in RECIPES}
    for name in REPORT_RECIPES:
        assert "tiny" in profiles_of(ROOT / "configs" / "recipes" / f"{name}.yaml")


@pytest.mark.parametrize("path,profile", CASES)
def test_shipped_recipe_validates_and_plans(path, profile, tmp_path):
    recipe = Recipe.load(path, profile=profile, workdir=str(tmp_path / "w"))
    rows = recipe.plan()
    assert [r["name"] for r in rows] == [s.name for s in recipe.stages] and rows
    assert {(r["action"], r["reason"]) for r in rows} == {("run", "new")}
    for spec in recipe.stages:  # every stage's typed config builds, every reference resolved
        config = recipe.config(spec.name)
        assert config.output_dir.startswith(str(tmp_path / "w" / spec.name))
        assert "${" not in json.dumps({k: v for k, v in vars(config).items() if isinstance(v, (str, list))})


@pytest.mark.parametrize("name", sorted(REPORT_RECIPES))
def test_real_scale_starts_from_hub_ids_and_tiny_from_made_models(name, tmp_path):
    path = ROOT / "configs" / "recipes" / f"{name}.yaml"
    real = Recipe.load(path, workdir=str(tmp_path / "real"))
    kinds = {s.kind for s in real.stages}
    assert not kinds & {"demo-data", "make-tiny-model"}
    first = real.config("sft")
    assert _HUB_ID.match(first.model_name_or_path) and not Path(first.model_name_or_path).exists()
    assert _HUB_ID.match(first.dataset) and "/" in first.dataset
    tiny = Recipe.load(path, profile="tiny", workdir=str(tmp_path / "tiny"))
    assert [s.kind for s in tiny.stages[:2]] == ["demo-data", "make-tiny-model"]
    assert tiny.config("sft").model_name_or_path == str(tmp_path / "tiny" / "tiny" / "model")
    assert all(
        Path(tiny.config(s.name).dataset).is_relative_to(tmp_path / "tiny") for s in tiny.stages if s.kind == "eval"
    )


def test_qwen2_uses_the_online_merging_optimizer_against_the_base(tmp_path):
    recipe = Recipe.load(ROOT / "configs" / "recipes" / "qwen2.yaml", workdir=str(tmp_path))
    dpo, rlhf = recipe.config("dpo"), recipe.config("rlhf")
    assert (dpo.optimizer_merge, dpo.merge_base, dpo.merge_reserve_p, dpo.merge_alpha) == (
        "ondare",
        "Qwen/Qwen2-0.5B",
        0.01,
        1e-7,
    )
    assert (rlhf.optimizer, rlhf.optimizer_merge, rlhf.merge_base) == ("online_dpo", "ondare", "Qwen/Qwen2-0.5B")
    assert (dpo.beta, dpo.learning_rate, rlhf.learning_rate) == (0.1, 1e-6, 1e-6)
    assert dpo.ref_model == recipe.config("sft").output_dir + "/model" and rlhf.model_name_or_path == str(
        tmp_path / "dpo" / "model"
    )


def test_llama3_rounds_chain_through_the_averaged_model(tmp_path):
    recipe = Recipe.load(ROOT / "configs" / "recipes" / "llama3.yaml", workdir=str(tmp_path))
    assert [s.name for s in recipe.stages if s.base == "merge"] == [f"merge_r{r}" for r in range(1, 7)]
    sft = str(tmp_path / "sft" / "model")
    assert recipe.config("rs_r1").model_name_or_path == [sft] and recipe.config("sft_rs_r1").model_name_or_path == sft
    assert recipe.config("rs_r2").model_name_or_path == [str(tmp_path / "best_r1" / "model")]
    best = recipe.config("best_r2")  # the best model so far: the round's average, or round 1's best
    assert (best.candidates, best.baseline, best.metric) == (
        [str(tmp_path / "eval_r2")],
        str(tmp_path / "best_r1"),
        "mean_reward",
    )
    assert recipe.config("best_r1").baseline == str(tmp_path / "eval_sft")
    assert recipe.config("rs_r2").num_samples == 10 and recipe.config("rs_r2").reward == [
        f"model:{tmp_path}/rm_r2/model"
    ]
    for seed, name in ((1, "dpo_a_r3"), (2, "dpo_b_r3")):
        dpo = recipe.config(name)
        assert (dpo.ref_model, dpo.model_name_or_path, dpo.seed) == (sft, str(tmp_path / "sft_rs_r3" / "model"), seed)
        assert (dpo.loss, dpo.beta, dpo.learning_rate, dpo.mask_formatting_tokens) == (
            ["sigmoid", "nll:0.2"],
            0.1,
            1e-5,
            True,
        )
    merge = recipe.config("merge_r3")
    assert (merge.method, merge.models) == ("average", [str(tmp_path / "dpo_a_r3"), str(tmp_path / "dpo_b_r3")])
    assert len(Recipe.load(recipe.path, profile="tiny", sets=["vars.rounds=1"], workdir=str(tmp_path)).stages) == 12


def test_gemma2_distils_then_merges_two_rloo_runs_toward_the_sft_model(tmp_path):
    recipe = Recipe.load(ROOT / "configs" / "recipes" / "gemma2.yaml", workdir=str(tmp_path))
    sft = recipe.config("sft")
    assert (recipe.by_name["sft"].kind, sft.teacher, sft.model_name_or_path) == (
        "distill",
        "google/gemma-2-9b-it",
        "google/gemma-2-2b",
    )
    assert (sft.lmbda, sft.beta) == (0.5, 0.0)
    assert recipe.config("rm").model_name_or_path == "google/gemma-2-27b"
    for seed, name in ((1, "rlhf_a"), (2, "rlhf_b")):
        rl = recipe.config(name)
        assert (rl.optimizer, rl.model_name_or_path, rl.seed, rl.reward) == (
            "rloo",
            str(tmp_path / "sft" / "model"),
            seed,
            [f"model:{tmp_path}/rm/model"],
        )
        assert rl.kl_coef > 0
    merge = recipe.config("merge")
    assert (merge.method, merge.base, merge.models) == (
        "slerp",
        str(tmp_path / "sft"),
        [str(tmp_path / "rlhf_a"), str(tmp_path / "rlhf_b")],
    )
    assert 0 < merge.eta < 1
    tiny = Recipe.load(recipe.path, profile="tiny", workdir=str(tmp_path / "t"))
    assert [s.name for s in tiny.stages[:4]] == ["data", "tiny", "teacher_init", "teacher"]
    assert tiny.config("sft").teacher == str(tmp_path / "t" / "teacher" / "model")
    assert tiny.config("teacher").model_name_or_path == str(tmp_path / "t" / "teacher_init" / "model")
    assert tiny.config("teacher_init").hidden_size >= tiny.config("tiny").hidden_size
    assert tiny.config("teacher_init").num_layers > tiny.config("tiny").num_layers


def test_afm_rounds_sample_a_committee_and_refresh_the_reward_model(tmp_path):
    recipe = Recipe.load(ROOT / "configs" / "recipes" / "afm.yaml", workdir=str(tmp_path))
    rm = recipe.config("rm")
    assert (rm.loss, rm.grade_levels) == ("soft_label", 3) and len(rm.grade_heads) == 4
    rs1, rs2 = recipe.config("rs_r1"), recipe.config("rs_r2")
    assert rs1.model_name_or_path == [str(tmp_path / "sft" / "model"), "Qwen/Qwen2.5-3B"]
    assert rs2.model_name_or_path == [
        str(tmp_path / "mdloo_r1" / "model"),
        str(tmp_path / "best_r1" / "model"),
    ]  # latest, best
    best = recipe.config("best_r2")
    assert (best.candidates, best.baseline) == (
        [str(tmp_path / "eval_dpo_r2"), str(tmp_path / "eval_r2")],
        str(tmp_path / "best_r1"),
    )
    assert (rs1.select, rs1.reward, rs2.reward) == (
        "pairs",
        [f"model:{tmp_path}/rm/model"],
        [f"model:{tmp_path}/rm_refresh_r1/model"],
    )
    refresh = recipe.config("rm_refresh_r2")
    assert (refresh.dataset, refresh.model_name_or_path) == (
        str(tmp_path / "rs_r2" / "data"),
        str(tmp_path / "sft" / "model"),
    )
    dpo, mdloo = recipe.config("dpo_r2"), recipe.config("mdloo_r2")
    assert (dpo.dataset, dpo.ref_model, dpo.model_name_or_path) == (
        str(tmp_path / "rs_r2" / "data"),
        str(tmp_path / "sft" / "model"),
        str(tmp_path / "mdloo_r1" / "model"),
    )
    assert (mdloo.optimizer, mdloo.reward, mdloo.model_name_or_path) == (
        "mdloo",
        [f"model:{tmp_path}/rm_refresh_r2/model"],
        str(tmp_path / "mdloo_r1" / "model"),
    )
    tiny = Recipe.load(recipe.path, profile="tiny", workdir=str(tmp_path / "t"))
    assert tiny.config("rs_r1").model_name_or_path == [
        str(tmp_path / "t" / "sft" / "model"),
        str(tmp_path / "t" / "tiny" / "model"),
    ]
    assert (tiny.config("rm").loss, tiny.config("rm").grade_heads) == (
        "bradley_terry",
        [],
    )  # the demo pairs have no levels/grades


# -- the two recipe features ------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


FEATURES = """\
    vars: {rounds: 2}
    profiles:
      tiny: {vars: {rounds: 3}, stages: {ev: {model_name_or_path: "${tiny.model}"}}}
    stages:
      - {name: tiny, kind: make-tiny-model, profiles: [tiny]}
      - repeat: ${vars.rounds}
        stages:
          - {name: ev, kind: eval, model_name_or_path: org/model, dataset: p.jsonl, reward: [rule:arithmetic]}
          - {name: extra, kind: eval, model_name_or_path: org/model, dataset: p.jsonl, reward: [rule:arithmetic], profiles: [other]}
"""


def test_profile_only_stages_and_repeat_from_a_var(tmp_path):
    path = write(tmp_path / "r.yaml", FEATURES)
    assert [s.name for s in Recipe.load(path).stages] == ["ev_r1", "ev_r2"]
    assert [s.name for s in Recipe.load(path, sets=["vars.rounds=1"]).stages] == ["ev_r1"]
    tiny = Recipe.load(path, profile="tiny", workdir=str(tmp_path / "w"))
    assert [s.name for s in tiny.stages] == ["tiny", "ev_r1", "ev_r2", "ev_r3"]
    assert tiny.config("ev_r3").model_name_or_path == str(tmp_path / "w" / "tiny" / "model")
    with pytest.raises(ConfigError, match=r"no stage named 'tiny'"):  # a profile-only stage is absent elsewhere
        Recipe.load(path, sets=["tiny.seed=3"])


@pytest.mark.parametrize(
    "change,message",
    [
        (("profiles: [tiny]}", "profiles: tiny}"), "'profiles' must be a non-empty list of profile names"),
        (("repeat: ${vars.rounds}", "repeat: ${vars.nrounds}"), r"repeat: \$\{vars.nrounds\} is not defined in vars"),
        (
            ("vars: {rounds: 2}", "vars: {rounds: two}"),
            r"a repeat block is 'repeat: N' \(N >= 1, or \$\{vars.NAME\}\)",
        ),
    ],
)
def test_bad_profiles_or_repeat_var_is_one_line_exit_2(tmp_path, change, message, capsys):
    from align.cli import main

    path = write(tmp_path / "r.yaml", FEATURES.replace(*change))
    assert main(["run", str(path), "--dry-run", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err
    assert __import__("re").search(message, err), err


# -- the tiny profiles, end to end on a test budget ---------------------------------------------

SMALL_DEMO = [
    "data.num_test=16",
    "data.num_prompts=48",
    "data.num_pairs=64",
    "tiny.hidden_size=64",
    "tiny.num_layers=2",
    "sft.max_steps=30",
    "sft.save_steps=10",
    "sft.per_device_train_batch_size=16",
]
TEST_BUDGET = {
    "qwen2": [
        *SMALL_DEMO,
        "dpo.max_steps=4",
        "dpo.per_device_train_batch_size=4",
        "dpo.save_steps=2",
        "rm.max_steps=4",
        "rm.per_device_train_batch_size=8",
        "rm.eval_split=0.25",
        "rm.save_steps=2",
        "rlhf.num_iterations=2",
        "rlhf.prompts_per_iteration=8",
        "rlhf.num_samples=4",
        "rlhf.save_every=1",
    ],
    "llama3": [
        *SMALL_DEMO,
        "vars.rounds=2",
        "vars.rs_prompts=24",
        "rm.max_steps=4",
        "rm.per_device_train_batch_size=8",
        "rm.eval_split=0.25",
        "rm.save_steps=2",
        "rs.num_samples=4",
        "rs.min_reward=null",
        "sft_rs.max_steps=4",
        "sft_rs.per_device_train_batch_size=8",
        "sft_rs.save_steps=2",
        "dpo_a.max_steps=4",
        "dpo_a.per_device_train_batch_size=4",
        "dpo_a.save_steps=2",
        "dpo_b.max_steps=4",
        "dpo_b.per_device_train_batch_size=4",
        "dpo_b.save_steps=2",
    ],
    "gemma2": [
        *SMALL_DEMO,
        "teacher_init.hidden_size=64",
        "teacher_init.num_layers=2",
        "teacher.max_steps=30",
        "teacher.save_steps=10",
        "teacher.per_device_train_batch_size=16",
        "sft.eval_max_prompts=8",
        "rm.max_steps=4",
        "rm.per_device_train_batch_size=8",
        "rm.eval_split=0.25",
        "rm.save_steps=2",
        *(
            f"{rl}.{k}"
            for rl in ("rlhf_a", "rlhf_b")
            for k in ("num_iterations=2", "prompts_per_iteration=8", "num_samples=4", "save_every=1")
        ),
    ],
    "afm": [
        *SMALL_DEMO,
        "vars.rounds=1",
        "vars.rs_prompts=24",
        "rm.max_steps=4",
        "rm.per_device_train_batch_size=8",
        "rm.eval_split=0.25",
        "rm.save_steps=2",
        "rs.num_samples=2",
        "rm_refresh.max_steps=4",
        "rm_refresh.per_device_train_batch_size=8",
        "rm_refresh.eval_split=0.25",
        "rm_refresh.save_steps=2",
        "dpo.max_steps=4",
        "dpo.per_device_train_batch_size=4",
        "dpo.save_steps=2",
        "mdloo.num_iterations=2",
        "mdloo.prompts_per_iteration=8",
        "mdloo.num_samples=4",
        "mdloo.save_every=1",
    ],
}
KEY_METRIC = {
    "eval": "held_out",
    "rm": "eval_accuracy",
    "rs": "kept_rows",
    "distill": "heldout_kl",
    "select": "chosen",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REPORT_RECIPES))
def test_tiny_profile_runs_end_to_end(name, tmp_path):
    path, workdir = ROOT / "configs" / "recipes" / f"{name}.yaml", tmp_path / "w"
    env = {
        **os.environ,
        "ALIGN_FINGERPRINT_CACHE": str(tmp_path / "fp.json"),
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "250",
    }
    sets = [arg for item in TEST_BUDGET[name] for arg in ("--set", item)]
    proc = subprocess.run(
        [*ALIGN, "run", path, "--profile", "tiny", "--workdir", workdir, *sets],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = [s.name for s in Recipe.load(path, profile="tiny", sets=TEST_BUDGET[name], workdir=str(workdir)).stages]
    status = json.loads(
        subprocess.run(
            [*ALIGN, "status", workdir, "--json"], capture_output=True, text=True, cwd=ROOT, env=env, check=True
        ).stdout
    )
    assert [r["name"] for r in status] == expected and {r["status"] for r in status} == {"done"}
    for row in status:  # each key metric in the table is the one in the stage's stage.json
        summary = json.loads((workdir / row["name"] / "stage.json").read_text())["summary"]
        metric = KEY_METRIC.get(row["kind"])
        if metric == "held_out":
            assert row["metrics"]["held_out"] == summary["mean_reward"] and 0.0 <= summary["mean_reward"] <= 1.0
            assert summary["num_prompts"] == 16
        elif metric:
            assert row["metrics"][metric] == summary[metric]
    RECIPE_CHECKS[name](workdir, lambda stage: json.loads((workdir / stage / "stage.json").read_text()))


def check_qwen2(workdir: Path, stage_json) -> None:
    for stage in ("dpo", "rlhf"):
        config = stage_json(stage)["config"]
        assert (config["optimizer_merge"], config["merge_base"]) == ("ondare", str(workdir / "tiny" / "model"))


def check_llama3(workdir: Path, stage_json) -> None:
    assert stage_json("merge_r1")["config"]["models"] == [str(workdir / "dpo_a_r1"), str(workdir / "dpo_b_r1")]
    assert stage_json("rs_r1")["config"]["model_name_or_path"] == [str(workdir / "sft" / "model")]
    # Each round's best: its average if that beats the best so far on held-out sums, else the best so far.
    baseline = ("eval_sft", stage_json("eval_sft")["summary"]["mean_reward"])
    for r in (1, 2):
        merged = stage_json(f"eval_r{r}")["summary"]["mean_reward"]
        expected = (f"eval_r{r}", merged) if merged > baseline[1] else baseline
        s = stage_json(f"best_r{r}")["summary"]
        assert (s["chosen"], s["mean_reward"]) == expected
        baseline = (f"best_r{r}", expected[1])
    assert stage_json("rs_r2")["config"]["model_name_or_path"] == [str(workdir / "best_r1" / "model")]


def check_gemma2(workdir: Path, stage_json) -> None:
    distill = stage_json("sft")
    assert distill["config"]["teacher"] == str(workdir / "teacher" / "model")
    assert distill["summary"]["heldout_kl"] > 0 and distill["summary"]["heldout_kl_before"] > 0
    merge = stage_json("merge")["config"]
    assert (merge["method"], merge["base"]) == ("slerp", str(workdir / "sft"))
    assert merge["models"] == [str(workdir / "rlhf_a"), str(workdir / "rlhf_b")]
    assert [stage_json(rl)["config"]["seed"] for rl in ("rlhf_a", "rlhf_b")] == [1, 2]


def check_afm(workdir: Path, stage_json) -> None:
    rs = stage_json("rs_r1")
    members = [str(workdir / "sft" / "model"), str(workdir / "tiny" / "model")]
    assert rs["config"]["model_name_or_path"] == members and rs["config"]["select"] == "pairs"
    assert (
        set(rs["summary"]["wins"]) <= set(members)
        and sum(rs["summary"]["wins"].values()) == rs["summary"]["kept_rows"] > 0
    )
    assert stage_json("rm_refresh_r1")["config"]["dataset"] == str(workdir / "rs_r1" / "data")
    assert stage_json("dpo_r1")["config"]["dataset"] == str(workdir / "rs_r1" / "data")
    assert stage_json("mdloo_r1")["config"]["optimizer"] == "mdloo"


RECIPE_CHECKS = {"qwen2": check_qwen2, "llama3": check_llama3, "gemma2": check_gemma2, "afm": check_afm}
