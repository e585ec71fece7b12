"""`align rlhf`: weight sync exactness, every optimizer learns, kill + resume, NaN and bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from align.cli import main
from align.rl.optimizers import OPTIMIZERS

from conftest import ALIGN, ROOT, read_jsonl, run_align

CONFIG = ROOT / "configs" / "demo_rlhf.yaml"


# ---------------------------------------------------------------------------------------------
# Weight sync: after each sync the engine scores fixed responses exactly as the policy does.
# ---------------------------------------------------------------------------------------------


def _engine_logprobs(engine, seqs: list[list[int]]) -> list[list[float]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=s) for s in seqs],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    return [[step[tok].logprob for tok, step in zip(s[1:], o.prompt_logprobs[1:])] for s, o in zip(seqs, outs)]


def _policy_logprobs(policy, seqs: list[list[int]]) -> list[list[float]]:
    from align.rl.rollout import token_logprobs

    with torch.no_grad():
        return [
            token_logprobs(policy, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0][0].tolist()
            for s in seqs
        ]


def _max_gap(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_sync_matches_policy_logprobs_full_and_lora(sft_vllm, sft_model):
    """Uses the session's engine (one vLLM per process: a second one's teardown would take the
    shared distributed state with it) and puts the SFT weights back afterwards."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.stages.rlhf import sync_engine

    tok = AutoTokenizer.from_pretrained(sft_model)
    seqs = [
        tok(f"<|user|>{a}+{b}=<|end|><|assistant|>{a + b}<|end|>", add_special_tokens=False).input_ids
        for a, b in [(12, 30), (7, 99), (55, 5)]
    ]
    policy = AutoModelForCausalLM.from_pretrained(sft_model)
    try:
        gaps = []
        for _ in range(2):  # two successive updates + syncs
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            before = _engine_logprobs(sft_vllm, seqs)
            sync_engine(sft_vllm, policy)
            after = _engine_logprobs(sft_vllm, seqs)
            gaps.append(_max_gap(after, _policy_logprobs(policy, seqs)))
            assert _max_gap(before, after) > 1e-2  # the engine really changed
        assert max(gaps) < 1e-4, gaps

        lora = get_peft_model(
            AutoModelForCausalLM.from_pretrained(sft_model),
            LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        )
        sync_engine(sft_vllm, lora)
        assert _max_gap(_engine_logprobs(sft_vllm, seqs), _policy_logprobs(lora, seqs)) < 1e-4
        # the adapter is unmerged again after the sync: the base weights are back (up to float rounding)
        base = AutoModelForCausalLM.from_pretrained(sft_model)
        q = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
        assert torch.allclose(
            dict(lora.named_parameters())[q], base.model.layers[0].self_attn.q_proj.weight, atol=1e-6
        )
    finally:
        sft_vllm.load_weights(load_file(str(sft_model / "model.safetensors")).items())


def test_vllm_logprobs_at_a_temperature_equal_the_losss(sft_vllm, sft_model):
    """Rollouts sampled at temperature 0.7: the log-probs vLLM reports for the tokens it drew are
    the ones the RL loss computes for them (``token_logprobs`` at the same temperature)."""
    from transformers import AutoModelForCausalLM

    from align.rl.rollout import build_rollouts, token_logprobs
    from sampling import SamplingParams
    from sampling.base import encode_prompts

    prompts = [[{"role": "user", "content": f"{a}+{b}="}] for a, b in [(12, 30), (7, 99), (55, 5)]]
    out = sft_vllm.generate(prompts, SamplingParams(n=4, temperature=0.7, max_tokens=8, seed=1, logprobs=True))
    r = build_rollouts(
        encode_prompts(sft_vllm.tokenizer, prompts),
        [[c.token_ids for c in cands] for cands in out],
        [[False] * 4] * 3,
        [0.0] * 12,
        pad_id=0,
    )
    engine = torch.zeros_like(r.mask)
    for row, c in enumerate(c for cands in out for c in cands):
        engine[row, r.mask[row].nonzero().squeeze(-1)] = torch.tensor(c.logprobs)
    policy = AutoModelForCausalLM.from_pretrained(sft_model)
    with torch.no_grad():
        at_t = token_logprobs(policy, r.input_ids, r.attention_mask, temperature=0.7)[0]
        at_1 = token_logprobs(policy, r.input_ids, r.attention_mask)[0]
    gap = ((engine - at_t).abs() * r.mask).max().item()
    assert gap < 1e-4, gap
    assert ((engine - at_1).abs() * r.mask).max().item() > 1e-2  # the temperature-1 policy is another one


def test_rlhf_refuses_nucleus_sampling_and_zero_temperature(tmp_path):
    from align.core.errors import ConfigError
    from align.stages.rlhf import RLHFConfig

    base = dict(
        model_name_or_path=str(tmp_path), dataset="p.jsonl", output_dir=str(tmp_path / "o"), reward=["rule:arithmetic"]
    )
    with pytest.raises(ConfigError, match="'top_p' must be 1.0 in rlhf, got 0.9: .* lower --temperature instead"):
        RLHFConfig(**base, top_p=0.9).validate()
    with pytest.raises(ConfigError, match="'temperature' must be > 0"):
        RLHFConfig(**base, temperature=0.0).validate()


# ---------------------------------------------------------------------------------------------
# Every optimizer learns on the demo task.
# ---------------------------------------------------------------------------------------------

# Per-optimizer settings on top of configs/demo_rlhf.yaml (cut to ITERATIONS iterations), and the
# least gain every optimizer must show in the batch reward (last 10% of iterations over the first
# 10%: here the last iteration over the first, which samples from the SFT model itself) and in the
# held-out reward (200 test prompts answered greedily before and after). An optimizer that does not
# update the policy scores the same held-out reward after as before, and its batch reward moves only
# by how batches of 64 prompts differ in difficulty (a few hundredths).
# The SFT fixture these start from is a different model on each kind of CPU (its 900 steps amplify
# the float differences between the kernels each CPU runs), and so is how far RL takes it in 8
# iterations. On a 2-core AVX2 EPYC, iteration 8 over iteration 1 gained +0.34 to +0.36 from an SFT
# model whose first batch scored 0.54, and at least +0.2 from one at 0.31 (online DPO +0.14 to +0.18
# over lr 2e-4/3e-4 and 1-2 inner steps, held-out 0.47 -> 0.73-0.76). On a 2-core AVX-512 EPYC (Zen 5), from an SFT model
# already at 0.76 held-out (0.55 in its first batch, sampled at temperature 1): +0.09 (online DPO)
# to +0.12 in batch reward and +0.06 to +0.085 held out, for every optimizer. The bars sit below both.
# Online DPO's batch gain moves most with which prompts the two batches hold: +0.074 and +0.119
# with seeds 0 and 1 from the same SFT model on a 2-core AVX-512 EPYC (held out +0.08 and +0.055),
# so its batch bar is lower; its held-out bar is everyone's.
ITERATIONS, MIN_GAIN, MIN_EVAL_GAIN = 8, 0.08, 0.05
MIN_BATCH_GAIN = {"online_dpo": 0.05}
LEARNING = {
    "rloo": [],
    "grpo": [],
    "mdloo": ["--inner_steps", "4"],
    "ppo": ["--inner_steps", "4"],
    "online_dpo": ["--learning_rate", "2e-4", "--inner_steps", "1", "--nll_coef", "0.2"],
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))  # each needs its LEARNING entry
def test_optimizer_learns(optimizer, tmp_path, sft_model, demo_data):
    out = tmp_path / optimizer
    proc = run_align(
        "rlhf",
        "--config",
        CONFIG,
        "--model_name_or_path",
        sft_model,
        "--dataset",
        demo_data / "prompts.jsonl",
        "--eval_dataset",
        demo_data / "test.jsonl",
        "--optimizer",
        optimizer,
        "--output_dir",
        out,
        "--num_iterations",
        ITERATIONS,
        *LEARNING[optimizer],
        check=True,
    )
    record = json.loads((out / "stage.json").read_text())
    s = record["summary"]
    print(optimizer, {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()})
    assert s["reward_last_10pct"] >= s["reward_first_10pct"] + MIN_BATCH_GAIN.get(optimizer, MIN_GAIN), s
    assert s["eval_mean_reward"] >= s["eval_mean_reward_before"] + MIN_EVAL_GAIN, s
    assert s["engine"] == "vllm"  # engine auto, with vLLM installed
    # the KV cache is sized to the rollouts (64 x K=8 short ones: 33 MiB, not 1 GiB) and holds them
    assert s["kv_cache_gb"] < 0.05 and "decodes them in waves" not in proc.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, ITERATIONS + 1))
    for key in (
        "reward_mean",
        "reward_std",
        "entropy",
        "response_length",
        "time_generate",
        "time_score",
        "time_train",
        "time_sync",
    ):
        assert all(isinstance(r[key], float) for r in rows), key
    assert (out / "model" / "model.safetensors").exists() and (out / "reward.png").exists()


def test_the_kv_cache_holds_an_iterations_longest_rollouts(tmp_path):
    """Unset, ``kv_cache_gb`` is what one rank's share of an iteration can need: its longest
    prompts (a batch that crosses into the next epoch can hold one twice) x K, each plus max_tokens,
    in 32-token pages, plus vLLM's null page; at least one max_model_len sequence."""
    from align.stages.rlhf import RLHFConfig, rollout_kv_cache_gb

    model_config = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    per_page = 32 * 2 * 2 * 4 * 16 * 4  # 32 tokens x K and V x 2 layers x 4 heads x 16 dims x fp32 = 32 KiB
    cfg = RLHFConfig(
        model_name_or_path=str(tmp_path),
        dataset="p.jsonl",
        output_dir="out",
        prompts_per_iteration=2,
        num_samples=4,
        max_tokens=14,
        max_model_len=128,
    )
    mib = lambda pages: math.ceil(pages * per_page / 2**20) / 1024  # noqa: E731
    # prompts of 10, 50 and 20 tokens: a batch of 2 may be 50 twice, 64 tokens = 2 pages x 4 samples each
    assert rollout_kv_cache_gb(cfg, model_config, [10, 50, 20], world=1) == mib(2 * 4 * 2 + 1)
    assert rollout_kv_cache_gb(cfg, model_config, [10, 50, 20], world=2) == mib(max(1 * 4 * 2, 128 // 32) + 1)
    # with a monitor of 20 prompts of 40 tokens (54 with max_tokens: 2 pages), sampled once each: its 40 pages
    assert rollout_kv_cache_gb(cfg, model_config, [10, 50, 20], 1, monitor_lengths=[40] * 20) == mib(20 * 2 + 1)
    assert rollout_kv_cache_gb(cfg, model_config, [10, 50, 20], 1, monitor_lengths=[10]) == mib(2 * 4 * 2 + 1)


# ---------------------------------------------------------------------------------------------
# Crash safety and bad input
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_prompts(demo_data, tmp_path_factory) -> Path:
    """48 demo prompts plus one far longer than the engine's max length (counted and skipped)."""
    rows = read_jsonl(demo_data / "prompts.jsonl")[:48]
    rows.append({"prompt": [{"role": "user", "content": "1+" * 60 + "1="}], "answer": "61", "prompt_id": "too_long"})
    path = tmp_path_factory.mktemp("rl") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rl_args(model, data, out, *extra):
    return [
        "rlhf",
        "--config",
        CONFIG,
        "--model_name_or_path",
        model,
        "--dataset",
        data,
        "--output_dir",
        out,
        "--num_iterations",
        "8",
        "--save_every",
        "2",
        "--prompts_per_iteration",
        "8",
        *extra,
    ]


def test_kill_and_resume_reproduces_next_batch(tmp_path, sft_model, small_prompts):
    from align.stages.rlhf import batch_indices
    from align.training.evaluation import load_prompts

    out = tmp_path / "rl"
    args = _rl_args(sft_model, small_prompts, out)
    proc = subprocess.Popen(
        [*ALIGN, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / "checkpoint-4").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "stage.json").exists()

    resumed = run_align(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    record = json.loads((out / "stage.json").read_text())
    assert record["summary"]["resumed_from_iteration"] >= 4
    assert record["summary"]["skipped_long_prompts"] == 1 and record["summary"]["prompts"] == 48
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))  # none lost, none twice
    ids = [r["prompt_id"] for r in load_prompts(str(small_prompts)) if r["prompt_id"] != "too_long"]
    for row in rows:
        expected = [ids[i] for i in batch_indices(len(ids), 8, row["step"] - 1, seed=0)]
        assert row["batch"] == hashlib.sha1(",".join(expected).encode()).hexdigest()[:12]


def test_nan_reward_stops_naming_prompt_and_keeps_checkpoint(tmp_path, sft_model, small_prompts):
    from align.stages.rlhf import batch_indices
    from align.training.evaluation import load_prompts

    ids = [r["prompt_id"] for r in load_prompts(str(small_prompts)) if r["prompt_id"] != "too_long"]
    seen = {ids[i] for it in range(2) for i in batch_indices(len(ids), 8, it, seed=0)}
    victim = next(
        ids[i] for i in batch_indices(len(ids), 8, 2, seed=0) if ids[i] not in seen
    )  # first seen in iteration 3
    out = tmp_path / "nan"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "usercode"), "ALIGN_TEST_NAN_PROMPT": victim}
    proc = subprocess.run(
        [*ALIGN, *map(str, _rl_args(sft_model, small_prompts, out, "--reward", "rl_scorers:nan_for_one_prompt"))],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"returned nan for prompt {victim}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "checkpoints" / "checkpoint-2" / "state.pt").exists()
    assert not (out / "stage.json").exists() and not (out / "model").exists()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--optimizer", "reinforce"], "unknown optimizer 'reinforce'"),
        (["--optimizer", "rloo", "--num_samples", "1"], "optimizer 'rloo' needs num_samples >= 2"),
        (["--optimizer", "grpo", "--num_samples", "1"], "optimizer 'grpo' needs num_samples >= 2"),
    ],
)
def test_bad_input(capsys, tmp_path, extra, message):
    code = main(
        [
            "rlhf",
            "--model_name_or_path",
            "m",
            "--dataset",
            "d",
            "--reward",
            "rule:arithmetic",
            "--output_dir",
            str(tmp_path),
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err
    if "unknown" in message:
        assert f"valid: {', '.join(OPTIMIZERS)}" in err
