"""Chat models stop where their turn ends, and rollouts hold exactly the tokens the policy sampled.

The model here is a base model whose chat template closes turns with ``<|end|>`` while its EOS is
another token, ``<|endoftext|>`` (as Qwen2.5 base: ``<|im_end|>`` vs ``<|endoftext|>``). After
SFT on chat data it ends each answer with ``<|end|>``: the saved generation config must list that
id, and both engines must stop on it instead of writing the next turn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, read_jsonl, run_align

PROMPTS = [[{"role": "user", "content": f"{a}+{b}="}] for a, b in [(12, 34), (5, 7), (40, 40), (3, 58)]]


@pytest.fixture(scope="module")
def turn_sft(tmp_path_factory, demo_data) -> Path:
    """A base model with a separate EOS, after a short demo SFT (the format, not the sums)."""
    from align.tasks.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("turn")
    base = make_tiny_model(root / "base", arch="llama", tokenizer="char", seed=0, end_of_text=True)
    run_align(
        "sft",
        "--config",
        ROOT / "configs" / "demo_sft.yaml",
        "--model_name_or_path",
        base,
        "--dataset",
        demo_data / "sft.jsonl",
        "--output_dir",
        root / "sft",
        "--max_steps",
        "150",
        "--learning_rate",
        "2e-3",
        "--lr_scheduler_type",
        "constant_with_warmup",
        "--save_steps",
        "1000",
        check=True,
        timeout=900,
    )
    return root / "sft"


def _ids(tok):
    return tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|endoftext|>")


def test_turn_end_is_found_from_the_template(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from align.tasks.tiny import make_tiny_model
    from sampling.base import stop_ids, turn_end_id

    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "m", end_of_text=True))
    end, eot = _ids(tok)
    assert tok.eos_token_id == eot != end
    assert turn_end_id(tok) == end
    assert stop_ids(tok) == [eot, end] and stop_ids(tok, [eot, 3]) == [eot, 3, end]
    same = AutoTokenizer.from_pretrained(tiny_model)  # EOS is the turn end: one stop id
    assert turn_end_id(same) == same.eos_token_id and stop_ids(same) == [same.eos_token_id]


@pytest.mark.slow
def test_sft_saves_the_turn_end_as_a_stop_id(turn_sft):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(turn_sft / "model")
    end, eot = _ids(tok)
    config = json.loads((turn_sft / "model" / "generation_config.json").read_text())
    assert config["eos_token_id"] == [eot, end]


@pytest.mark.slow
def test_transformers_engine_stops_at_the_turn_end(turn_sft):
    from sampling import SamplingParams
    from sampling.engines import build_engine

    engine = build_engine("transformers", str(turn_sft / "model"), max_model_len=64)
    end, _ = _ids(engine.tokenizer)
    out = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_tokens=24, seed=0))
    cands = [c for cands in out for c in cands]
    assert all(c.finish_reason == "stop" and c.token_ids[-1] == end for c in cands), [c.text for c in cands]
    assert all(end not in c.token_ids[:-1] and "user" not in c.text for c in cands)


@pytest.mark.slow
def test_rs_samples_end_at_the_turn_end_with_no_second_turn(turn_sft, demo_data, tmp_path):
    pytest.importorskip("vllm")
    run_align(
        "rs",
        "--config",
        ROOT / "configs" / "demo_rs.yaml",
        "--model_name_or_path",
        turn_sft / "model",
        "--dataset",
        demo_data / "test.jsonl",
        "--output_dir",
        tmp_path / "rs",
        "--num_samples",
        "4",
        "--max_tokens",
        "24",
        "--select",
        "all",
        "--min_reward",
        "0",
        "--engine",
        "vllm",
        check=True,
        timeout=900,
    )
    cands = read_jsonl(tmp_path / "rs" / "candidates.jsonl")
    assert len(cands) == 4 * 200
    assert [c["finish_reason"] for c in cands].count("stop") == len(cands)
    # A one-turn answer: a few characters and <|end|>, never a next turn written up to max_tokens.
    assert max(c["num_tokens"] for c in cands) < 12 and sum(c["num_tokens"] for c in cands) / len(cands) < 6


@pytest.mark.slow
def test_vllm_rollouts_hold_exactly_the_sampled_ids(turn_sft):
    """The model's generation config lists two stop ids; the samples end with <|end|> (not the
    tokenizer's EOS), and the rollouts built from them add no token the policy did not sample."""
    pytest.importorskip("vllm")
    from align.rl.rollout import build_rollouts
    from sampling import SamplingParams
    from sampling.base import encode_prompts
    from sampling.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(turn_sft / "model"), max_model_len=64, kv_cache_gb=0.1, seed=0)
    try:
        out = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_tokens=24, seed=0))
        end, eot = _ids(engine.tokenizer)
        prompts = encode_prompts(engine.tokenizer, PROMPTS)
    finally:
        engine.close()
    assert all(c.finish_reason == "stop" and c.token_ids[-1] == end for cands in out for c in cands)
    r = build_rollouts(
        prompts,
        [[c.token_ids for c in cands] for cands in out],
        [[c.finish_reason == "length" for c in cands] for cands in out],
        [0.0] * 16,
        pad_id=0,
    )
    for row, (ids, c) in enumerate((ids, c) for ids, cands in zip(prompts, out) for c in cands):
        n = len(ids) + len(c.token_ids)
        assert r.input_ids[row, :n].tolist() == ids + c.token_ids
        assert r.attention_mask[row].sum() == n and int(r.mask[row].sum()) == len(c.token_ids)
        assert eot not in r.input_ids[row, :n].tolist()
