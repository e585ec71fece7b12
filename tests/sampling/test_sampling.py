"""sampling/: selection strategies (pure), and the two engines' shared contract on the SFT model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from align.core.errors import ConfigError
from sampling import ENGINES, STRATEGIES, SamplingParams, Scored, SelectOptions, dedupe, get_strategy
from sampling.engines import build_engine

ROW = {"prompt": [{"role": "user", "content": "1+2="}], "answer": "3", "prompt_id": "add_01_02"}


def cands(*rewards: float) -> list[Scored]:
    return [Scored(i, f"t{i}", r) for i, r in enumerate(rewards)]


def test_registry_rejects_unknown_names():
    with pytest.raises(ConfigError) as err:
        get_strategy("pair")
    assert (
        str(err.value) == f"unknown selection strategy 'pair' (did you mean 'pairs'?); valid: {', '.join(STRATEGIES)}"
    )
    with pytest.raises(ConfigError) as err:
        build_engine("hf", "x")
    assert str(err.value) == f"unknown engine 'hf'; valid: {', '.join(ENGINES)}"


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_keeps_the_prompt_and_its_columns(name):
    rows = get_strategy(name)(ROW, cands(0.0, 1.0), SelectOptions())
    assert rows and all(list(r)[0] == "prompt" and r["prompt"] == ROW["prompt"] for r in rows)
    assert all(r["answer"] == "3" and r["prompt_id"] == "add_01_02" for r in rows)


def test_best_keeps_the_top_candidate_first_index_on_ties():
    best = get_strategy("best")
    (row,) = best(ROW, cands(0.0, 1.0, 1.0, 0.5), SelectOptions())
    assert row == {
        "prompt": ROW["prompt"],
        "answer": "3",
        "prompt_id": "add_01_02",
        "completion": [{"role": "assistant", "content": "t1"}],
        "candidate_index": 1,
        "reward": 1.0,
        "model": "",
    }
    assert list(row)[:1] == ["prompt"]
    assert best(ROW, cands(0.0, 0.5), SelectOptions(min_reward=1.0)) == []
    assert len(best(ROW, cands(0.0, 1.0), SelectOptions(min_reward=1.0))) == 1


def test_pairs_best_vs_worst_skip_ties_and_small_margins():
    pairs = get_strategy("pairs")
    (row,) = pairs(ROW, cands(0.2, 1.0, 0.0, 0.0), SelectOptions())
    assert row["chosen"] == [{"role": "assistant", "content": "t1"}]
    assert row["rejected"] == [{"role": "assistant", "content": "t2"}]  # first of the tied worst
    assert (row["chosen_index"], row["rejected_index"], row["chosen_reward"], row["rejected_reward"]) == (
        1,
        2,
        1.0,
        0.0,
    )
    assert pairs(ROW, cands(1.0, 1.0, 1.0), SelectOptions()) == []  # all tied: no preference
    assert pairs(ROW, cands(0.7), SelectOptions()) == []  # a single distinct candidate
    assert pairs(ROW, cands(0.5, 0.3), SelectOptions(min_margin=0.25)) == []
    assert len(pairs(ROW, cands(0.5, 0.25), SelectOptions(min_margin=0.25))) == 1


def test_all_keeps_every_candidate_in_index_order():
    rows = get_strategy("all")(ROW, [Scored(3, "c", 0.1), Scored(0, "a", 0.9)], SelectOptions())
    assert [(r["candidate_index"], r["completion"][0]["content"], r["reward"]) for r in rows] == [
        (0, "a", 0.9),
        (3, "c", 0.1),
    ]
    assert all(r["prompt_id"] == "add_01_02" for r in rows)


def test_dedupe_points_duplicates_at_their_first_occurrence():
    assert dedupe(["a", "b", "a", "a", "c", "b"]) == [None, None, 0, 0, None, 1]
    assert dedupe([]) == []


def test_sampling_params_reject_empty_requests():
    with pytest.raises(ValueError, match="n and max_tokens must be >= 1"):
        SamplingParams(n=0)
    assert SamplingParams().prompt_seed(3) is None


def test_prompt_seeds_own_disjoint_blocks_of_sample_streams():
    # vLLM seeds sample k of a request seeded s with s + k: the streams of two prompts must never
    # meet, whichever prompts and samples (with seeds seed + i, prompt i's sample k met prompt
    # i + 1's sample k - 1).
    params = SamplingParams(seed=5, n=8)
    seeds = [params.prompt_seed(i) for i in range(2000)]
    streams = {s + k for s in seeds for k in range(params.n)}
    assert len(streams) == 2000 * 8
    assert all(0 <= s < 2**63 and s % 2**16 == 0 for s in seeds)
    assert SamplingParams(seeds=(5, 6, 7)).prompt_seed(1) == params.prompt_seed(1)  # a key is a key, however given


# ------------------------------------------------------------------------------- real engines

PROMPTS = [
    [{"role": "user", "content": f"{a}+{b}="}] for a, b in [(12, 34), (5, 7), (99, 1), (40, 40), (3, 58), (77, 16)]
]


@pytest.fixture(scope="module")
def hf_engine(sft_model):
    return build_engine("transformers", str(sft_model), max_model_len=64)


def forward_logprobs(
    model, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0, top_k: int = 0
) -> list[float]:
    """log p(token) of each completion token under a plain transformers forward pass (fp32), of the
    distribution sampled at ``temperature`` (and ``top_k``: the k most likely tokens, renormalized)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
    return logp[pos, torch.tensor(completion_ids)].tolist()


@pytest.mark.slow
def test_engines_agree_on_greedy_answers_and_the_output_contract(sft_vllm, hf_engine):
    eos = hf_engine.tokenizer.eos_token_id
    params = SamplingParams(temperature=0.0, max_tokens=8)
    vllm_out, hf_out = sft_vllm.generate(PROMPTS, params), hf_engine.generate(PROMPTS, params)
    assert [len(c) for c in vllm_out] == [1] * len(PROMPTS)
    assert [c[0].token_ids for c in vllm_out] == [c[0].token_ids for c in hf_out]
    assert [c[0].text for c in vllm_out] == [c[0].text for c in hf_out]
    for (cand,) in vllm_out:
        # The trained model stops: EOS ends the ids (an RL loss needs it), not the text.
        assert cand.finish_reason == "stop" and cand.token_ids[-1] == eos
        assert cand.text == hf_engine.tokenizer.decode(cand.token_ids[:-1]) and cand.text.isdigit()


@pytest.mark.slow
def test_vllm_sampling_is_seeded_per_prompt(sft_vllm):
    params = SamplingParams(n=8, temperature=1.5, max_tokens=8, seed=11)
    full = sft_vllm.generate(PROMPTS, params)
    assert [len(c) for c in full] == [8] * len(PROMPTS)
    assert len({c.text for c in full[0]}) > 1  # real sampling
    again = sft_vllm.generate(PROMPTS, params)
    assert [[c.token_ids for c in p] for p in again] == [[c.token_ids for c in p] for p in full]
    # Prompt i is sampled with seed + i: a slice with seed + offset gives the same candidates.
    tail = sft_vllm.generate(PROMPTS[2:], SamplingParams(n=8, temperature=1.5, max_tokens=8, seed=13))
    assert [[c.text for c in p] for p in tail] == [[c.text for c in p] for p in full[2:]]
    other = sft_vllm.generate(PROMPTS, SamplingParams(n=8, temperature=1.5, max_tokens=8, seed=12))
    assert [[c.text for c in p] for p in other] != [[c.text for c in p] for p in full]


@pytest.mark.slow
def test_vllm_samples_of_identical_prompts_draw_independent_streams(tiny_model):
    """Six copies of one prompt, K=4, from a random model: 24 different samples. With seeds
    seed + i, vLLM's per-sample seeds seed + i + k gave 6 + 4 - 1 = 9 streams for the 24."""
    pytest.importorskip("vllm")
    from sampling.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(tiny_model), max_model_len=64, kv_cache_gb=0.1, seed=0)
    try:
        out = engine.generate([PROMPTS[0]] * 6, SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=0))
    finally:
        engine.close()
    assert len({tuple(c.token_ids) for cands in out for c in cands}) == 24


@pytest.mark.slow
def test_transformers_engine_logprobs_are_the_sampling_distributions(hf_engine):
    out = hf_engine.generate(
        PROMPTS[:3], SamplingParams(n=2, temperature=0.7, top_k=5, max_tokens=6, seed=0, logprobs=True)
    )
    ids = [
        hf_engine.tokenizer(t, add_special_tokens=False).input_ids
        for t in [
            hf_engine.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROMPTS[:3]
        ]
    ]
    for prompt_ids, cands in zip(ids, out):
        for cand in cands:
            assert len(cand.logprobs) == len(cand.token_ids) > 0
            ref = forward_logprobs(hf_engine.model, prompt_ids, cand.token_ids, temperature=0.7, top_k=5)
            assert max(abs(a - b) for a, b in zip(cand.logprobs, ref)) < 1e-4


@pytest.mark.slow
def test_vllm_load_weights_then_logprobs_match_transformers(sft_vllm, tiny_model, sft_model):
    """After load_weights the engine samples from the new weights, with log-probs equal (fp32) to
    a transformers forward pass of the same weights; loading the old ones back restores it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    before = [c[0].text for c in sft_vllm.generate(PROMPTS, greedy)]
    new = load_file(str(tiny_model / "model.safetensors"))  # same architecture, random weights
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    sft_vllm.load_weights(new.items())
    try:
        out = sft_vllm.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=3, logprobs=True))
        prompt_ids = [
            sft_vllm.tokenizer(
                sft_vllm.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            ).input_ids
            for p in PROMPTS
        ]
        worst, checked = 0.0, 0
        for ids, cands in zip(prompt_ids, out):
            for cand in cands:
                ref = forward_logprobs(reference, ids, cand.token_ids)
                worst = max(worst, max(abs(a - b) for a, b in zip(cand.logprobs, ref)))
                checked += len(ref)
        assert checked >= 4 * len(PROMPTS) * 4
        assert worst < 1e-4, worst
        assert [c[0].text for c in sft_vllm.generate(PROMPTS, greedy)] != before  # the random model's answers
    finally:
        sft_vllm.load_weights(load_file(str(sft_model / "model.safetensors")).items())
    assert [c[0].text for c in sft_vllm.generate(PROMPTS, greedy)] == before


@pytest.mark.slow
def test_vllm_seeded_sampling_with_more_prompt_tokens_than_one_step(sft_vllm):
    """256 sequences x ~45 prompt tokens > one step's 4096-token budget: with chunked prefill a
    seeded prompt would be split across steps, which crashes vLLM 0.32 on CPU."""
    long = [[{"role": "user", "content": "1+1=" * 10 + f"{i}+{i}="}] for i in range(32)]
    out = sft_vllm.generate(long, SamplingParams(n=8, temperature=1.0, max_tokens=4, seed=0))
    assert [len(c) for c in out] == [8] * 32 and all(c.token_ids for cands in out for c in cands)


def test_engine_threads_reach_the_engine_and_are_a_speed_setting_only(monkeypatch, tmp_path):
    """`threads` (and `enforce_eager`, `kv_block_size`) are passed to the engine a stage builds, are
    checked, and are run control: a finished rs, eval or rlhf stage stays up to date when only they change."""
    import sampling.engines
    from align.stages.eval import EvalConfig
    from align.stages.rlhf import RLHFConfig
    from align.stages.rs import RSConfig

    seen = {}
    monkeypatch.setattr(sampling.engines, "build_engine", lambda name, path, **kw: seen.update(kw, name=name))
    base = {
        "model_name_or_path": str(tmp_path),
        "dataset": "p.jsonl",
        "output_dir": str(tmp_path / "o"),
        "reward": ["rule:arithmetic"],
    }
    RSConfig(**base, engine="vllm", threads=2).build_engine(str(tmp_path))
    # enforce_eager unset: the engine picks by device (eager on CPU, sampling.vllm_engine.engine_kwargs)
    assert (seen["name"], seen["threads"], seen["enforce_eager"]) == ("vllm", 2, None)
    RSConfig(**base, engine="vllm", enforce_eager=False).build_engine(str(tmp_path))
    assert seen["enforce_eager"] is False and seen["kv_block_size"] == 32
    RSConfig(**base, engine="vllm", kv_block_size=64).build_engine(str(tmp_path))
    assert seen["kv_block_size"] == 64
    for kind in (RSConfig, EvalConfig, RLHFConfig):
        small, big = (kind(**base, kv_block_size=n) for n in (32, 128))
        assert "kv_block_size" in kind.run_control and small.identity() == big.identity(), kind.__name__
        one, two = (kind(**base, threads=n) for n in (1, 2))
        assert "threads" in kind.run_control and one.identity() == two.identity(), kind.__name__
        eager, compiled = (kind(**base, enforce_eager=e) for e in (True, False))
        assert "enforce_eager" in kind.run_control and eager.identity() == compiled.identity(), kind.__name__
    with pytest.raises(ConfigError, match="'threads' must be >= 1, got 0"):
        RSConfig(**base, threads=0).validate_engine()
    with pytest.raises(ConfigError, match="'kv_block_size' must be a positive multiple of 32, got 16"):
        RSConfig(**base, kv_block_size=16).validate_engine()


def test_kv_blocks_needed_counts_the_longest_sequences_decoded_together():
    from sampling.vllm_engine import kv_blocks_needed

    # sequences of 100 and 300 tokens, 2 samples each, in 128-token blocks: 1 and 3 blocks each
    assert kv_blocks_needed([100, 300], n=2, block_size=128, max_num_seqs=256) == 2 * 1 + 2 * 3
    assert kv_blocks_needed([100, 300], n=2, block_size=128, max_num_seqs=3) == 3 + 3 + 1  # the longest first
    assert kv_blocks_needed([128, 129], n=1, block_size=128, max_num_seqs=8) == 1 + 2


SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}


def test_kv_cache_gb_for_holds_the_sequences_decoded_together_and_one_of_full_length():
    from sampling.vllm_engine import kv_cache_bytes_per_token, kv_cache_gb_for

    assert kv_cache_bytes_per_token(SMOLLM2) == 2 * 30 * 3 * 64 * 4 == 46080  # K and V, 3 KV heads of 64, fp32
    assert kv_cache_bytes_per_token(SMOLLM2, "bfloat16") == 23040
    assert kv_cache_bytes_per_token({**SMOLLM2, "head_dim": 32}) == 23040
    # 16 sequences of 72-87 tokens, 4 samples each, in 32-token pages: 3 pages each, and vLLM's null page
    gib = kv_cache_gb_for(SMOLLM2, range(72, 88), 4, block_size=32, max_num_seqs=256, max_model_len=512)
    assert gib == math.ceil((16 * 4 * 3 + 1) * 32 * 46080 / 2**20) / 1024 == 272 / 1024
    # at most max_num_seqs decode together, and never fewer pages than one max_model_len sequence takes
    assert (
        kv_cache_gb_for(SMOLLM2, range(72, 88), 4, block_size=32, max_num_seqs=8, max_model_len=512)
        == math.ceil(25 * 32 * 46080 / 2**20) / 1024
    )
    assert (
        kv_cache_gb_for(SMOLLM2, [10], 1, block_size=32, max_num_seqs=256, max_model_len=512)
        == math.ceil(17 * 32 * 46080 / 2**20) / 1024
    )


def test_a_kv_cache_sized_from_the_work_holds_it_within_a_share_of_the_free_memory():
    from sampling.vllm_engine import KV_MEMORY_SHARE, kv_cache_gb_for, work_kv_cache_gb

    sized = dict(block_size=32, max_num_seqs=256, max_model_len=512, dtype="float32")
    plenty = 64 * 2**30
    # 16 prompts of 24-39 tokens + 48 new tokens = 72-87 tokens, 4 samples each: kv_cache_gb_for's 272 MiB
    assert work_kv_cache_gb(SMOLLM2, range(24, 40), 4, 48, **sized, available_bytes=plenty) == 272 / 1024
    assert kv_cache_gb_for(SMOLLM2, range(72, 88), 4, **sized) == 272 / 1024
    # a prompt + max_tokens past max_model_len is cut there, as generate cuts max_tokens
    assert work_kv_cache_gb(SMOLLM2, [500], 1, 48, **sized, available_bytes=plenty) == kv_cache_gb_for(
        SMOLLM2, [512], 1, **sized
    )
    # 1 GiB free: at most a quarter of it (the engine then decodes in waves and says so)
    assert KV_MEMORY_SHARE == 0.25
    assert work_kv_cache_gb(SMOLLM2, [40] * 64, 8, 64, **sized, available_bytes=2**30) == 0.25
    # never below one max_model_len sequence, vLLM's minimum
    floor = kv_cache_gb_for(SMOLLM2, [], 1, **sized)
    assert (
        work_kv_cache_gb(SMOLLM2, [40] * 64, 8, 64, **sized, available_bytes=2**20)
        == floor
        == math.ceil(17 * 32 * 46080 / 2**20) / 1024
    )


@pytest.mark.slow
def test_an_unset_kv_cache_is_sized_from_the_work_and_a_set_one_wins(tiny_model):
    """On CPU, an engine told its work (rs and eval tell it) holds that work's sequences at once;
    without one it keeps the fixed 1 GiB; an explicit kv_cache_gb is taken as given."""
    pytest.importorskip("vllm")
    import json

    from sampling.base import Workload, encode_prompts
    from sampling.vllm_engine import work_kv_cache_gb

    work = Workload([PROMPTS[0]] * 6, n=4, max_tokens=16)
    engine = build_engine("vllm", str(tiny_model), max_model_len=64, seed=0, work=work)
    try:
        lengths = [len(ids) for ids in encode_prompts(engine.tokenizer, work.prompts, None, 64)]
        config = json.loads((tiny_model / "config.json").read_text())
        expected = work_kv_cache_gb(
            config,
            lengths,
            4,
            16,
            block_size=32,
            max_num_seqs=256,
            max_model_len=64,
            dtype="float32",
            available_bytes=2**40,
        )
        assert engine.kv_cache_gb == expected < 0.01  # a tiny model's 24 short sequences: MiBs, not 1 GiB
        assert engine.kv_blocks >= 24 * -(-(max(lengths) + 16) // 32)  # what the 24 sequences take at once
    finally:
        engine.close()
    engine = build_engine("vllm", str(tiny_model), max_model_len=64, seed=0, work=work, kv_cache_gb=0.05)
    try:
        assert engine.kv_cache_gb == 0.05
    finally:
        engine.close()


def test_the_k_samples_of_a_prompt_share_its_full_kv_pages(sft_vllm):
    """Pages of 32 tokens (``kv_block_size``), not vLLM's CPU default of 128: the 4 samples of a
    40-token prompt share its first page (vLLM counts those tokens as cached) and each computes
    only the other 8; with 128-token pages nothing is shared and each sample computes all 40."""
    from vllm import SamplingParams as VLLMParams
    from vllm.inputs import TokensPrompt

    ids = [5 + i % 23 for i in range(40)]
    out = sft_vllm.llm.generate(
        [TokensPrompt(prompt_token_ids=ids)], VLLMParams(n=4, max_tokens=2, seed=0), use_tqdm=False
    )
    assert sft_vllm.block_size == 32 and len(out[0].outputs) == 4
    assert out[0].num_cached_tokens == 32


def test_vllm_reads_its_kv_cache_size_and_says_once_when_it_is_too_small(sft_vllm, monkeypatch, capsys):
    """The engine knows its cache in blocks (0.5 GiB over the tiny model's bytes per block); when a
    call's sequences need more blocks than it has, one stderr line says so and what would fit."""
    import json

    from sampling.vllm_engine import kv_cache_bytes_per_token

    config = json.loads((Path(sft_vllm.llm.llm_engine.model_config.model) / "config.json").read_text())
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    block_bytes = 2 * config["num_hidden_layers"] * kv_heads * head_dim * 4 * sft_vllm.block_size  # K and V, fp32
    assert sft_vllm.block_size == 32 and sft_vllm.kv_blocks == int(0.5 * 2**30) // block_bytes
    assert kv_cache_bytes_per_token(config) * 32 == block_bytes  # what kv_cache_gb_for sizes caches with
    sft_vllm.generate(PROMPTS, SamplingParams(n=4, max_tokens=4, seed=0))
    assert capsys.readouterr().err == ""  # plenty of room

    monkeypatch.setattr(sft_vllm, "kv_blocks", 10)
    monkeypatch.setattr(sft_vllm, "_said_kv_short", False)
    lengths = [20] * 6  # 6 prompts x 4 samples, one 32-token block each: 24 blocks
    sft_vllm._check_kv_capacity(lengths, 4)
    sft_vllm._check_kv_capacity(lengths, 4)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "align: the vLLM KV cache (0.5 GiB, 10 blocks of 32 tokens) holds fewer than the 24 sequences it"
        " could decode together (24 blocks), so it decodes them in waves; --kv_cache_gb 1.2 would hold them all"
    ]


def test_closing_a_second_engine_leaves_the_open_one_working(sft_vllm, tiny_model):
    """vLLM's distributed groups belong to the process: a run that builds and closes its own engine
    (``align rs`` called from Python, in the process holding another) must not tear them down under
    the open one, whose next step would fail with "pipeline model parallel group is not initialized"."""
    from sampling.vllm_engine import VLLMEngine

    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=8)
    before = [c[0].text for c in sft_vllm.generate(PROMPTS, greedy)]
    open_before = VLLMEngine.open_engines()
    other = VLLMEngine(str(tiny_model), max_model_len=64, kv_cache_gb=0.1, threads=2)
    assert VLLMEngine.open_engines() == open_before + 1
    assert [c[0].text for c in other.generate(PROMPTS, greedy)] != before  # a different (random) model
    other.close()
    other.close()  # twice is harmless and counts once
    assert VLLMEngine.open_engines() == open_before
    assert [c[0].text for c in sft_vllm.generate(PROMPTS, greedy)] == before
    assert torch.get_num_threads() == other._num_threads


def test_an_engine_dropped_without_close_leaves_the_open_one_working(sft_vllm, tiny_model):
    """A run that fails after building its engine and never closes it leaves the engine to the
    garbage collector, whose finalizer (vLLM's ``EngineCore.shutdown``) tears down the process's
    distributed groups whenever it runs, and the shared ``sft_vllm`` engine's next step would fail
    in whatever test came next. The groups go only once no engine of ours is alive."""
    import gc

    from sampling.vllm_engine import VLLMEngine

    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=8)
    before = [c[0].text for c in sft_vllm.generate(PROMPTS, greedy)]
    other = VLLMEngine(str(tiny_model), max_model_len=64, kv_cache_gb=0.1)
    assert VLLMEngine.open_engines() >= 2
    other.generate(PROMPTS, greedy)
    del other
    gc.collect()
    assert [c[0].text for c in sft_vllm.generate(PROMPTS, greedy)] == before
