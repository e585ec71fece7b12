"""The vLLM engine, in-process so that an online loop can update its weights.

In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set before vLLM is imported): no child
process, a ~5 s start for a tiny model, and ``load_weights`` is a direct call. Eager by default
(``enforce_eager``): compiling (``enforce_eager=False``) adds a one-time torch.compile at start-up. fp32 by default
(``dtype="auto"`` would turn an fp32 checkpoint into bf16 on CPU, and log-probs must match the
trainer's). Log-probs are vLLM's ``processed_logprobs``: of the distribution sampled from (after
temperature and top-k/top-p), as a trainer computes them at the sampling temperature; vLLM's
default, ``raw_logprobs``, would give temperature-1 log-probs whatever the temperature. Stop
tokens are the tokenizer's EOS and every id of the model's ``generation_config.eos_token_id``
(vLLM reads generation_config.json), plus the chat template's end of turn (``turn_end_id``), and
the one that stopped a sample stays in its ids. Prefix caching is on: the K samples of a prompt are one request with ``n=K``, so
they share the prompt's KV pages -- but only full pages, and vLLM's CPU backend pages in blocks of
128 tokens: a ~50-token chat prompt then fills none, and every sample computes the whole prompt
again (on SmolLM2-135M, 64 prompts x K=8: ~23k prompt tokens through the model for 27k generated).
The engine pages in ``kv_block_size`` = 32 tokens instead, so the samples share the prompt's first
full pages and each computes only its tail: 1.4x the tokens/s at that size (2-core AVX-512 EPYC, 2
threads, blocks of 32 vs 128: eager 661-706 vs 472-512 tokens/s; docs/vllm-cpu.md#6). The KV cache is sized explicitly
(``kv_cache_gb``, passed as ``kv_cache_memory_bytes``), since vLLM on CPU would otherwise size it
from host RAM; vLLM's legacy ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB), when set in the environment,
takes precedence. A cache too small for the sequences a call could decode together
(``max_num_seqs``, or all of them) makes vLLM decode them in waves, so ``generate`` says once, on
stderr, that the cache is short and what ``kv_cache_gb`` would hold them all (``kv_blocks_needed``;
an upper bound: prompt blocks shared across the K samples are counted once per sample). With
128-token blocks, 2 GiB held 364 of those 512 SmolLM2 sequences, yet a cache for all of them
decoded no faster (202-211 vs 190-206 tokens/s on an AVX2 machine): at 364 sequences a step is
already as efficient. With a bigger model or longer answers a short cache costs more.

Chunked prefill is off (vLLM's CPU default is on): vLLM 0.32's CPU runner crashes ("CPU
Generator does not use offset") when a seeded request's prompt is split across steps, which
happens as soon as one step's prompts exceed ``max_num_batched_tokens``.

``generate`` runs with ``threads`` torch threads (default 1, what vLLM itself sets for CPU
serving, except that in-process its worker's no-op ``set_num_threads`` stops it from doing so)
and restores the process's count afterwards. On 2 shared cores, 2 threads made each decode step
5-30x slower (every small op waits for the second thread's time slice).

Weight updates use ``collective_rpc("reload_weights")`` + ``reset_prefix_cache()``; the call
TRL uses (``model.load_weights`` on the runner's model) fails on CPU in fp32 because the CPU
linear layers repack their weights after loading (docs/vllm-cpu.md#9).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import weakref
from typing import Any, Iterable, Iterator

from align.heap import keep_freed_memory
from sampling import cpu_sampler
from sampling.base import ENGINES, Candidate, SamplingParams, encode_prompts, stop_ids


@ENGINES.register("vllm")
class VLLMEngine:
    name = "vllm"
    # The engines alive in this process (closed ones leave it at close(), dropped ones when they are
    # collected). vLLM's distributed groups are process-wide and every engine shares them.
    _alive: "weakref.WeakSet[VLLMEngine]" = weakref.WeakSet()
    torch_set_num_threads: Any = None  # torch's own, saved before the first engine replaces it

    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int = 512, kv_cache_gb: float = 1.0,
                 seed: int = 0, system_prompt: str | None = None, trust_remote_code: bool = False,
                 gpu_memory_utilization: float = 0.3, max_num_seqs: int = 256, kv_block_size: int = 32,
                 threads: int = 1, enforce_eager: bool = True, **_: Any):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        # In-process, vLLM's automatic OpenMP binding would pin this whole process (the trainer
        # too) to the cores it picks, leaving one of two cores idle while training; keep torch's own.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        import torch
        from transformers import AutoTokenizer
        from vllm import LLM

        # vLLM's CPU worker replaces torch.set_num_threads with a no-op in this process
        # (docs/vllm-cpu.md#8); keep the real one (an engine already open has replaced it), and the
        # last engine to close puts it back.
        if not VLLMEngine._alive:
            VLLMEngine.torch_set_num_threads = torch.set_num_threads
        self._set_num_threads, self._num_threads = VLLMEngine.torch_set_num_threads, torch.get_num_threads()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.system_prompt = system_prompt
        self.max_model_len = max_model_len
        self.threads = threads
        _teardown_only_when_none_alive()
        self.llm = LLM(
            model=str(model_path), dtype=dtype, enforce_eager=enforce_eager, max_model_len=max_model_len, seed=seed,
            enable_prefix_caching=True, trust_remote_code=trust_remote_code,
            kv_cache_memory_bytes=int(kv_cache_gb * 2**30), gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs, block_size=kv_block_size, enable_chunked_prefill=False, max_num_batched_tokens=max(4096, max_model_len),
            logprobs_mode="processed_logprobs",
        )
        cache = self.llm.llm_engine.vllm_config.cache_config
        self.max_num_seqs, self.kv_cache_gb = max_num_seqs, kv_cache_gb
        self.kv_blocks, self.block_size = cache.num_gpu_blocks, cache.block_size
        self._said_kv_short = False
        # vLLM stops on the EOS and generation_config.json's ids by itself; the template's end of
        # turn is added for a model whose generation config does not list it (a base model's).
        self.stop_token_ids = [i for i in stop_ids(self.tokenizer) if i != self.tokenizer.eos_token_id]
        VLLMEngine._alive.add(self)
        self.sampler = "align" if cpu_sampler.install(self.llm) else "vllm"  # which draws the samples

    @classmethod
    def open_engines(cls) -> int:
        """How many engines are alive in this process."""
        return len(cls._alive)

    @classmethod
    def from_pretrained(cls, model_path: str, **options: Any) -> "VLLMEngine":
        return cls(model_path, **options)

    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Candidate]]:
        from vllm import SamplingParams as VLLMParams
        from vllm.inputs import TokensPrompt

        encoded = encode_prompts(self.tokenizer, prompts, self.system_prompt, self.max_model_len)
        greedy = params.temperature == 0
        per_prompt = [
            VLLMParams(
                n=params.n, temperature=params.temperature, top_p=1.0 if greedy else params.top_p,
                top_k=0 if greedy else params.top_k, max_tokens=min(params.max_tokens, self.max_model_len - len(ids)),
                stop=list(params.stop) or None, stop_token_ids=self.stop_token_ids or None, seed=params.prompt_seed(i),
                logprobs=0 if params.logprobs else None, skip_special_tokens=True,
            )
            for i, ids in enumerate(encoded)
        ]
        self._check_kv_capacity([len(ids) + p.max_tokens for ids, p in zip(encoded, per_prompt)], params.n)
        with self._torch_threads(), keep_freed_memory():
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], per_prompt, use_tqdm=False)
        return [[_candidate(c, params.logprobs) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]

    def _check_kv_capacity(self, sequence_lengths: list[int], n: int) -> None:
        """Say once (stderr) when the KV cache cannot hold the sequences vLLM would decode together."""
        if self._said_kv_short or not self.kv_blocks:
            return
        needed = kv_blocks_needed(sequence_lengths, n, self.block_size, self.max_num_seqs)
        if needed <= self.kv_blocks:
            return
        self._said_kv_short = True
        together = min(len(sequence_lengths) * n, self.max_num_seqs)
        gib = math.ceil(10 * self.kv_cache_gb * needed / self.kv_blocks) / 10
        print(f"align: the vLLM KV cache ({self.kv_cache_gb:g} GiB, {self.kv_blocks} blocks of {self.block_size} tokens) "
              f"holds fewer than the {together} sequences it could decode together ({needed} blocks), so it decodes "
              f"them in waves; --kv_cache_gb {gib:g} would hold them all", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def _torch_threads(self) -> Iterator[None]:
        """Generate with ``threads`` torch threads (vLLM's CPU serving choice: 1), then restore the
        process's count for whatever runs next in it (a trainer, in an online loop)."""
        import torch

        before = torch.get_num_threads()
        self._set_num_threads(self.threads)
        try:
            yield
        finally:
            self._set_num_threads(before)

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Load new weights (Hugging Face names) and drop cached KV pages computed with the old ones."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(named_tensors))})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down. When no other engine is alive, torch.set_num_threads is put back and
        vLLM's process-wide distributed groups are torn down too (``_teardown_only_when_none_alive``)."""
        if self.llm is None:
            return
        import torch

        VLLMEngine._alive.discard(self)
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        if not VLLMEngine._alive:
            torch.set_num_threads = self._set_num_threads
        self._set_num_threads(self._num_threads)


def _teardown_only_when_none_alive() -> None:
    """Make vLLM's engine shutdown leave the process's distributed groups alone while an engine of
    ours is alive.

    vLLM's distributed state (its tensor/pipeline-parallel groups) belongs to the process, not to an
    engine, yet ``EngineCore.shutdown`` tears it down unconditionally: tearing it down while another
    engine is alive breaks that one's next step ("pipeline model parallel group is not
    initialized"). The shutdown runs on ``close()`` and also from a garbage-collector finalizer
    when an engine is dropped without one (a run that raised after building it), at whatever moment
    the collector gets there. So the teardown vLLM's engine module calls is replaced, once, by one
    that only collects garbage while any ``VLLMEngine`` is alive, and tears down otherwise: with
    one engine at a time, vLLM's own behaviour. An engine dropped unclosed may be alive still when
    its own finalizer runs; the groups then stay up for the next engine, which reuses them.
    """
    import vllm.v1.engine.core as engine_core

    teardown = engine_core.cleanup_dist_env_and_memory
    if getattr(teardown, "align_guard", False):
        return

    def cleanup_dist_env_and_memory(*args: Any, **kwargs: Any) -> None:
        if VLLMEngine._alive:
            gc.collect()
        else:
            teardown(*args, **kwargs)

    cleanup_dist_env_and_memory.align_guard = True  # type: ignore[attr-defined]
    engine_core.cleanup_dist_env_and_memory = cleanup_dist_env_and_memory


def kv_blocks_needed(sequence_lengths: Iterable[int], n: int, block_size: int, max_num_seqs: int) -> int:
    """KV-cache blocks the longest ``max_num_seqs`` of the sequences need at full length, where each
    of ``sequence_lengths`` (prompt + new tokens) is decoded ``n`` times (counting every sample's
    prompt blocks, though prefix caching shares the full ones: an upper bound)."""
    per_sequence = sorted((-(-length // block_size) for length in sequence_lengths), reverse=True)
    blocks = [b for b in per_sequence for _ in range(n)]
    return sum(blocks[:max_num_seqs])


KV_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 4}  # auto: at most fp32's


def kv_cache_bytes_per_token(model_config: dict, dtype: str = "float32") -> int:
    """Bytes of KV cache one token takes across all layers: a key and a value of
    ``num_key_value_heads x head_dim`` per layer (a Hugging Face ``config.json``)."""
    heads = model_config["num_attention_heads"]
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    kv_heads = model_config.get("num_key_value_heads") or heads
    return 2 * model_config["num_hidden_layers"] * kv_heads * head_dim * KV_DTYPE_BYTES[dtype]


def kv_cache_gb_for(model_config: dict, sequence_lengths: Iterable[int], n: int, *, block_size: int, max_num_seqs: int,
                    max_model_len: int, dtype: str = "float32") -> float:
    """GiB of KV cache (rounded up to a MiB) that holds at once the sequences one call could decode
    together (``kv_blocks_needed``), never fewer blocks than one ``max_model_len`` sequence takes
    (vLLM refuses to start with less), plus the block vLLM keeps back as its null block."""
    needed = max(kv_blocks_needed(sequence_lengths, n, block_size, max_num_seqs), -(-max_model_len // block_size)) + 1
    mib = -(-needed * block_size * kv_cache_bytes_per_token(model_config, dtype) // 2**20)
    return mib / 1024


def _candidate(output, with_logprobs: bool) -> Candidate:
    ids = list(output.token_ids)
    logprobs = None
    if with_logprobs:
        logprobs = [step[tok].logprob for tok, step in zip(ids, output.logprobs)]
    return Candidate(output.text, ids, output.finish_reason or "length", logprobs)
