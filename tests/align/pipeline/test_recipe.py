"""Recipes and stage identity without training: parsing, validation errors, references, profiles,
input fingerprints (cached), stage_state, the standalone commands' input check, and the workdir lock."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from align.cli import main
from align.core.config import build_config
from align.core.errors import ConfigError
from align.core.fingerprint import DigestCache, fingerprint, input_fingerprints
from align.core.stage_dir import Stage, stage_state
from align.pipeline.recipe import Recipe, stage_kinds
from align.stages.eval import EvalConfig

from conftest import ALIGN, ROOT, run_align

QUICKSTART = ROOT / "configs" / "recipes" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_FINGERPRINT_CACHE", str(tmp_path / "fp-cache.json"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """\
    workdir: {workdir}
    vars: {{steps: 7}}
    profiles:
      small: {{vars: {{steps: 3}}, stages: {{ev: {{max_prompts: 2}}}}}}
    stages:
      - {{name: data, kind: demo-data}}
      - {{name: tiny, kind: make-tiny-model}}
      - name: sft
        kind: sft
        model_name_or_path: ${{tiny.model}}
        dataset: ${{data.data}}/sft.jsonl
        max_steps: ${{vars.steps}}
      - repeat: 2
        stages:
          - name: dpo
            kind: dpo
            model_name_or_path: ${{prev.dpo.model|sft.model}}
            ref_model: ${{sft.model}}
            dataset: ${{data.data}}/pairs.jsonl
            seed: ${{round}}
          - name: ev
            kind: eval
            model_name_or_path: ${{dpo.model}}
            dataset: ${{data.data}}/test.jsonl
            reward: [rule:arithmetic]
      - name: last
        kind: eval
        model_name_or_path: ${{dpo.model}}
        dataset: ${{data.data}}/test.jsonl
        reward: [rule:arithmetic]
"""


def test_references_rounds_profiles_and_sets(tmp_path):
    path = write(tmp_path / "r.yaml", GOOD.format(workdir=tmp_path / "w"))
    recipe = Recipe.load(path)
    w = tmp_path / "w"
    assert [s.name for s in recipe.stages] == ["data", "tiny", "sft", "dpo_r1", "ev_r1", "dpo_r2", "ev_r2", "last"]
    sft = recipe.config("sft")
    assert (sft.model_name_or_path, sft.dataset, sft.max_steps) == (
        str(w / "tiny/model"),
        f"{w}/data/data/sft.jsonl",
        7,
    )
    assert sft.output_dir == str(w / "sft")
    assert recipe.config("tiny").output_dir == str(w / "tiny/model")  # make-tiny-model writes its model there
    d1, d2 = recipe.config("dpo_r1"), recipe.config("dpo_r2")
    assert d1.model_name_or_path == str(w / "sft/model") and d2.model_name_or_path == str(w / "dpo_r1/model")
    assert d1.ref_model == d2.ref_model == str(w / "sft/model") and (d1.seed, d2.seed) == (1, 2)
    assert recipe.config("ev_r2").model_name_or_path == str(w / "dpo_r2/model")  # same round
    assert recipe.config("last").model_name_or_path == str(w / "dpo_r2/model")  # after the block: the last round
    assert recipe.deps("dpo_r2") == ["data", "sft", "dpo_r1"]

    small = Recipe.load(
        path, profile="small", sets=["sft.learning_rate=3e-4", "ev_r2.max_prompts=5"], workdir=str(tmp_path / "o")
    )
    assert small.config("sft").max_steps == 3 and small.config("sft").learning_rate == 3e-4
    assert (small.config("ev_r1").max_prompts, small.config("ev_r2").max_prompts) == (2, 5)
    assert small.config("sft").output_dir == str(tmp_path / "o" / "sft")
    assert small.set("vars.steps", 11).config("sft").max_steps == 11
    assert small.config("sft").max_steps == 3  # set() returns a copy


BAD = {
    "unknown kind": (
        "  - {name: x, kind: sfx}\n",
        "stage 'x': unknown kind 'sfx'; did you mean 'sft'? (valid: " + ", ".join(stage_kinds()) + ")",
    ),
    "forward reference": (
        "  - {name: x, kind: eval, model_name_or_path: '${later.model}', dataset: d, reward: [rule:arithmetic]}\n"
        "  - {name: later, kind: demo-data}\n",
        "stage 'x', key 'model_name_or_path': ${later.model}: stage 'later' comes later",
    ),
    "unknown reference": (
        "  - {name: x, kind: eval, model_name_or_path: '${sfy.model}', dataset: d, reward: [rule:arithmetic]}\n",
        "stage 'x', key 'model_name_or_path': ${sfy.model}: no stage named 'sfy'",
    ),
    "key typo": ("  - {name: x, kind: demo-data, num_tests: 3}\n", "stage 'x': unknown key 'num_tests' (stage 'x' in"),
    "wrong type": (
        "  - {name: x, kind: demo-data, num_test: many}\n",
        "stage 'x': config key 'num_test' (stage 'x' in",
    ),
    "unknown attribute": (
        "  - {name: a, kind: demo-data}\n  - {name: x, kind: sft, model_name_or_path: m, dataset: '${a.weights}'}\n",
        "${a.weights}: unknown attribute 'weights' (use model, data, dir or summary.KEY)",
    ),
    "prev in round 1": (
        "  - repeat: 2\n    stages:\n      - {name: x, kind: sft, dataset: d, model_name_or_path: '${prev.x.model}'}\n",
        "${prev.x.model} has no previous round in round 1",
    ),
    "runner's key": ("  - {name: x, kind: demo-data, output_dir: elsewhere}\n", "'output_dir' is set by align run"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_one_line_exit_2_before_any_work(tmp_path, capsys, case):
    stages, message = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(f"workdir: {tmp_path / 'w'}\nstages:\n{stages}")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "w").exists()  # nothing started, not even the workdir


def test_bad_recipe_yaml_syntax_typo_hint_and_options(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - name: x\n    kind: [demo-data\n")
    assert main(["run", str(path)]) == 2
    assert "bad.yaml:4: " in capsys.readouterr().err
    path.write_text("stages:\n  - {name: x, kind: demo-data, num_promts: 3}\n")
    assert main(["run", str(path)]) == 2
    assert "did you mean num_prompts?" in capsys.readouterr().err
    good = write(tmp_path / "r.yaml", GOOD.format(workdir=tmp_path / "w"))
    for argv, message in [
        (["--profile", "huge"], "--profile huge: "),
        (["--set", "sfx.max_steps=3"], "no stage named 'sfx' in "),
        (["--set", "sft.max_steps=lots"], "config key 'max_steps' (stage 'sft' in"),
        (["--force", "nope"], "--force nope: no such stage"),
    ]:
        assert main(["run", str(good), "--dry-run", *argv]) == 2
        assert message in capsys.readouterr().err


def test_quickstart_recipe_validates_in_every_profile():
    for profile in (None, "test"):
        recipe = Recipe.load(QUICKSTART, profile=profile)
        assert [s.kind for s in recipe.stages] == [
            "demo-data",
            "make-tiny-model",
            "sft",
            "eval",
            "rm",
            "rs",
            "sft",
            "eval",
            "rs",
            "dpo",
            "eval",
            "rlhf",
            "eval",
        ]
    assert Recipe.load(QUICKSTART).config("rs_pairs").reward == ["rule:arithmetic", "model:runs/quickstart/rm/model"]


# -- fingerprints and stage identity -----------------------------------------------------------


def test_fingerprints_are_content_hashes_cached_by_size_and_mtime(tmp_path):
    data = write(tmp_path / "d.jsonl", '{"a": 1}\n')
    folder = tmp_path / "model"
    write(folder / "w.bin", "weights")
    write(folder / ".hidden", "ignored")
    cache = DigestCache(tmp_path / "cache.json")
    first = fingerprint(str(data), cache)
    assert first.startswith("sha256:") and fingerprint(f"model:{folder}", cache).startswith("model:tree:")
    assert fingerprint("rule:arithmetic", cache) == "rule:arithmetic" and fingerprint(["x", None], cache) == [
        "x",
        None,
    ]
    cache.save()
    again = DigestCache(tmp_path / "cache.json")
    assert fingerprint(str(data), again) == first and fingerprint(f"model:{folder}", again) and again.hashed == 0
    tree = fingerprint(str(folder), again)
    (folder / ".hidden").write_text("changed")  # dotfiles are not part of a folder's fingerprint
    assert fingerprint(str(folder), again) == tree
    data.write_text('{"a": 2}\n')
    assert fingerprint(str(data), again) != first and again.hashed == 1


def _eval_config(tmp_path: Path) -> EvalConfig:
    write(tmp_path / "model" / "config.json", "{}")
    write(tmp_path / "test.jsonl", '{"prompt": "1+1=", "answer": "2"}\n')
    return build_config(
        EvalConfig,
        {
            "model_name_or_path": str(tmp_path / "model"),
            "dataset": str(tmp_path / "test.jsonl"),
            "reward": ["rule:arithmetic"],
            "output_dir": str(tmp_path / "out"),
        },
    )


def test_stage_state_covers_inputs_and_prepare_names_them(tmp_path):
    cfg = _eval_config(tmp_path)
    assert stage_state("eval", cfg, cfg.output_dir) == ("new", "")
    stage = Stage("eval", cfg, cfg.output_dir)
    assert stage.prepare()
    record = stage.finish({"mean_reward": 0.5})
    assert set(record["inputs"]) == {"model_name_or_path", "dataset", "reward", "judges", "reference_model"}
    assert record["inputs"]["dataset"].startswith("sha256:") and record["inputs"]["reward"] == ["rule:arithmetic"]
    assert stage_state("eval", cfg, cfg.output_dir) == ("up_to_date", "")
    assert not Stage("eval", cfg, cfg.output_dir).prepare()

    other = build_config(
        EvalConfig,
        {**{k: getattr(cfg, k) for k in ("model_name_or_path", "dataset", "reward", "output_dir")}, "max_tokens": 9},
    )
    assert stage_state("eval", other, cfg.output_dir) == ("config_changed", "max_tokens: 32 -> 9")
    assert stage_state("rs", cfg, cfg.output_dir)[0] == "config_changed"

    (tmp_path / "test.jsonl").write_text('{"prompt": "2+2=", "answer": "4"}\n')
    state, detail = stage_state("eval", cfg, cfg.output_dir)
    assert state == "input_changed" and detail == f"dataset ({tmp_path / 'test.jsonl'}) content changed"
    with pytest.raises(ConfigError, match=r"changed inputs \(dataset .* content changed\); pass --overwrite"):
        Stage("eval", cfg, cfg.output_dir).prepare()
    (tmp_path / "model" / "config.json").write_text('{"x": 1}')
    assert "model_name_or_path" in stage_state("eval", cfg, cfg.output_dir)[1]
    assert Stage("eval", cfg, cfg.output_dir).prepare(overwrite=True)
    (tmp_path / "out" / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    assert stage_state("eval", cfg, cfg.output_dir)[0] == "incomplete"


def test_an_unfinished_stage_whose_input_changed_restarts_instead_of_resuming(tmp_path):
    """A trainer records the input fingerprints it starts from beside its checkpoints; when they no
    longer match, `align run` restarts the stage (overwrite) and a standalone --resume is refused."""
    write(tmp_path / "model" / "config.json", "{}")
    data = write(tmp_path / "sft.jsonl", '{"prompt": "1+1=", "completion": "2"}\n')
    path = write(
        tmp_path / "r.yaml",
        f"""\
        workdir: {tmp_path / "w"}
        stages:
          - {{name: sft, kind: sft, model_name_or_path: {tmp_path / "model"}, dataset: {data}, max_steps: 4}}
    """,
    )
    recipe = Recipe.load(path)
    cfg, out = recipe.config("sft"), recipe.stage_dir("sft")
    stage = Stage("sft", cfg, out)
    assert stage.prepare()  # what `align sft` does before loading the model and data
    assert not (out / "checkpoints" / "inputs.json").exists()
    stage.record_inputs()  # what it does when training begins (StageCallback.on_train_begin)
    recorded = json.loads((out / "checkpoints" / "inputs.json").read_text())
    assert recorded == input_fingerprints(cfg) and recorded["dataset"].startswith("sha256:")
    write(out / "checkpoints" / "checkpoint-2" / "trainer_state.json", "{}")  # then killed after a checkpoint
    assert [(r["action"], r["reason"]) for r in recipe.plan()] == [
        ("resume", "incomplete, resumes: unfinished run found")
    ]

    data.write_text('{"prompt": "1+2=", "completion": "3"}\n')
    changed = f"dataset ({data}) content changed since the unfinished run"
    assert [(r["action"], r["reason"]) for r in recipe.plan()] == [("overwrite", f"input changed: {changed}")]
    with pytest.raises(
        ConfigError,
        match=re.escape(f"holds an unfinished 'sft' run with changed inputs ({changed}); pass --overwrite"),
    ):
        Stage("sft", cfg, out).prepare(resume=True)
    stage = Stage("sft", cfg, out)
    assert stage.prepare(overwrite=True)  # what the runner's overwrite does: start over
    assert not (out / "checkpoints" / "checkpoint-2").exists()
    stage.record_inputs()
    assert json.loads((out / "checkpoints" / "inputs.json").read_text()) == input_fingerprints(cfg) != recorded


def test_an_unfinished_stage_whose_config_changed_restarts_instead_of_resuming(tmp_path):
    """A trainer records its config identity beside its checkpoints too: a checkpoint of a run at
    another learning rate is never continued as this run's; a change of run control (--resume) is
    not a change."""
    write(tmp_path / "model" / "config.json", "{}")
    data = write(tmp_path / "sft.jsonl", '{"prompt": "1+1=", "completion": "2"}\n')
    text = """\
        workdir: {w}
        stages:
          - {{name: sft, kind: sft, model_name_or_path: {m}, dataset: {d}, max_steps: 4, learning_rate: {lr}}}
    """
    path = write(tmp_path / "r.yaml", text.format(w=tmp_path / "w", m=tmp_path / "model", d=data, lr="1.0e-4"))
    recipe = Recipe.load(path)
    cfg, out = recipe.config("sft"), recipe.stage_dir("sft")
    stage = Stage("sft", cfg, out)
    assert stage.prepare()
    stage.record_inputs()
    assert json.loads((out / "checkpoints" / "config.json").read_text())["learning_rate"] == 1e-4
    write(out / "checkpoints" / "checkpoint-2" / "trainer_state.json", "{}")
    assert [(r["action"], r["reason"]) for r in recipe.plan()] == [
        ("resume", "incomplete, resumes: unfinished run found")
    ]
    shutil.copytree(tmp_path / "w", tmp_path / "copy")  # the run copied elsewhere is the same run
    assert [(r["action"], r["reason"]) for r in Recipe.load(path, workdir=str(tmp_path / "copy")).plan()] == [
        ("resume", "incomplete, resumes: unfinished run found")
    ]

    write(tmp_path / "r.yaml", text.format(w=tmp_path / "w", m=tmp_path / "model", d=data, lr="3.0e-4"))
    recipe = Recipe.load(path)
    assert [(r["action"], r["reason"]) for r in recipe.plan()] == [
        ("overwrite", "config changed: learning_rate: 0.0001 -> 0.0003")
    ]
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "holds an unfinished 'sft' run with a different config (learning_rate: 0.0001 -> 0.0003); pass --overwrite"
        ),
    ):
        Stage("sft", recipe.config("sft"), out).prepare(resume=True)


def test_every_stage_declares_its_input_fields():
    from align.core.config import fields_of
    from align.pipeline.recipe import commands, stage_kinds

    pathlike = {"model_name_or_path", "dataset", "eval_dataset", "ref_model", "reward", "eval_reward"}
    for kind in stage_kinds():
        cls = commands()[kind].config
        fields = set(fields_of(cls))
        assert set(cls.inputs) <= fields, kind
        assert fields & pathlike <= set(cls.inputs), (kind, fields & pathlike - set(cls.inputs))
    assert input_fingerprints(commands()["demo-data"].config(output_dir="x")) == {}


@pytest.mark.slow
def test_standalone_command_sees_a_regenerated_dataset(tmp_path, tiny_model):
    """A new user's case: regenerate the data, rerun the same command: it must not say 'done'."""
    data = write(
        tmp_path / "test.jsonl",
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)),
    )
    args = [
        "eval",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        data,
        "--reward",
        "rule:arithmetic",
        "--engine",
        "transformers",
        "--max_tokens",
        "2",
        "--output_dir",
        tmp_path / "ev",
    ]
    env_cache = os.environ["ALIGN_FINGERPRINT_CACHE"]
    assert env_cache  # the subprocess inherits this test's cache file
    first = run_align(*args, check=True)
    assert "mean reward" in first.stdout
    finished = json.loads((tmp_path / "ev" / "stage.json").read_text())["finished_at"]
    assert run_align(*args, check=True).returncode == 0  # same data: a no-op
    assert json.loads((tmp_path / "ev" / "stage.json").read_text())["finished_at"] == finished
    data.write_text(data.read_text().replace('"1+1="', '"1+2="').replace('"answer": "2"', '"answer": "3"'))
    again = run_align(*args)
    assert again.returncode == 2, again.stderr
    assert f"changed inputs (dataset ({data}) content changed); pass --overwrite" in again.stderr
    assert run_align(*args, "--overwrite", check=True).returncode == 0
    assert json.loads((tmp_path / "ev" / "eval.jsonl").read_text().splitlines()[1])["prompt"] == "1+2="


# -- the workdir lock ----------------------------------------------------------------------------


@pytest.mark.slow
def test_second_run_exits_75_naming_the_holder_and_kill_9_frees_the_lock(tmp_path):
    workdir = tmp_path / "w"
    recipe = write(
        tmp_path / "r.yaml",
        f"workdir: {workdir}\nstages:\n  - {{name: data, kind: demo-data, num_test: 4, num_prompts: 4, num_pairs: 4}}\n",
    )
    hold = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from align.pipeline.runner import WorkdirLock
        with WorkdirLock(Path({str(workdir)!r})):
            print("held", flush=True)
            time.sleep(600)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert hold.stdout.readline().strip() == "held"
        started = time.time()
        second = run_align("run", recipe)
        assert second.returncode == 75, second.stderr
        assert time.time() - started < 30
        import socket

        assert f"is in use by another align run (pid {hold.pid} on {socket.gethostname()}, started 20" in second.stderr
        assert second.stderr.count("\n") == 1
        assert not (workdir / "data").exists()
        status = run_align("status", workdir)
        assert status.returncode == 2 and "has no run.json" in status.stderr
    finally:
        hold.send_signal(signal.SIGKILL)
        hold.wait()
    third = run_align("run", recipe)
    assert third.returncode == 0, third.stderr
    assert (workdir / "data" / "stage.json").exists() and (workdir / "data" / "data" / "test.jsonl").exists()
    assert json.loads((workdir / "run.json").read_text())["stages"]["data"]["status"] == "done"


@pytest.mark.slow
def test_status_needs_only_the_workdir_and_reloads_the_recipe_run_json_names(tmp_path, monkeypatch):
    """`align status W` takes the recipe from W/run.json (the recorded path, or, when the checkout
    moved, the same place relative to W) and plans from the run's working directory, so W may be
    spelled any way; without the recipe, finished stages say they were not checked."""
    import shutil

    from align.pipeline.status import workdir_status

    clone = tmp_path / "clone"
    recipe = write(
        clone / "configs" / "r.yaml",
        """\
        stages:
          - {name: data, kind: demo-data, num_test: 4, num_prompts: 4, num_pairs: 4}
    """,
    )
    ran = subprocess.run(
        [*ALIGN, "run", "configs/r.yaml", "--workdir", "runs/w"], cwd=clone, capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr
    run = json.loads((clone / "runs" / "w" / "run.json").read_text())
    assert (run["recipe"], run["recipe_from_workdir"], run["workdir"]) == (
        str(recipe),
        "../../configs/r.yaml",
        "runs/w",
    )
    status = subprocess.run(
        [*ALIGN, "status", "clone/runs/w"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert status.returncode == 0 and status.stderr == ""
    assert [line.split("\u2502")[1:4] for line in status.stdout.splitlines() if "demo-data" in line] == [
        [" data  ", " demo-data ", " done   "]
    ]
    assert [(r["status"], r["why"]) for r in workdir_status(clone / "runs" / "w")] == [("done", "")]  # absolute W too

    recipe.write_text(recipe.read_text().replace("num_test: 4", "num_test: 5"))  # the recipe, not W, changed
    assert [(r["status"], r["why"]) for r in workdir_status(clone / "runs" / "w")] == [
        ("stale", "config changed: num_test: 4 -> 5")
    ]
    shutil.move(clone, tmp_path / "moved")  # the recorded paths are gone; the one relative to W is there
    monkeypatch.chdir(tmp_path / "moved")
    assert [(r["status"], r["why"]) for r in workdir_status("runs/w")] == [
        ("stale", "config changed: num_test: 4 -> 5")
    ]
    (tmp_path / "moved" / "configs" / "r.yaml").unlink()
    assert [(r["status"], r["why"]) for r in workdir_status("runs/w")] == [
        ("done", f"not checked for changes: recipe {recipe} not found")
    ]


def test_python_api_runs_one_stage_and_reads_results(tmp_path):
    """Recipe.load -> .set -> .plan -> .run_stage -> .results, without the CLI."""
    path = write(
        tmp_path / "r.yaml",
        f"""\
        workdir: {tmp_path / "w"}
        stages:
          - {{name: data, kind: demo-data, num_test: 4, num_prompts: 4, num_pairs: 4}}
          - {{name: more, kind: demo-data, num_test: 5, num_prompts: 4, num_pairs: 4}}
    """,
    )
    recipe = Recipe.load(path).set("data.num_test", 6)
    assert [(r["name"], r["action"], r["reason"]) for r in recipe.plan()] == [
        ("data", "run", "new"),
        ("more", "run", "new"),
    ]
    assert recipe.run_stage("data") == 0
    assert len((tmp_path / "w" / "data" / "data" / "test.jsonl").read_text().splitlines()) == 6
    assert [r["action"] for r in recipe.plan()] == ["skip", "run"]
    results = recipe.results()
    assert [(r["name"], r["status"]) for r in results["stages"]] == [("data", "done"), ("more", "pending")]
    assert list(results["metrics"]["stage"]) == ["data", "more"]
    assert Recipe.load(path).plan()[0]["reason"] == "config changed: num_test: 6 -> 4"
