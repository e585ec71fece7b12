"""Build an engine by name from a stage config: the options every generating stage shares.

``engine: auto`` picks vLLM when it is installed, else transformers ``generate``, and says so
on stderr when it falls back. Only a missing vLLM falls back: an installed vLLM that fails to
import or to start (a broken build, a setting it rejects) stops the run with its own error,
rather than becoming a several-times slower run nobody notices. Each stage records the engine
it used (``engine.name``) in its stage.json summary.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal

from align.core.config import option
from align.core.errors import ConfigError
from align.core.gguf import resolve_model_path
from sampling import hf, vllm_engine  # noqa: F401  register the engines
from sampling.base import ENGINES, Engine, Workload


def default_engine() -> str:
    """'vllm' when it is installed (CPU or GPU build), else 'transformers'.

    Installed means importable by name (``importlib.util.find_spec``); whether it then imports
    and starts is the vLLM engine's business, and its errors propagate.
    """
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


@ENGINES.register("auto")
class AutoEngine:
    """Not an engine of its own: ``from_pretrained`` builds ``default_engine()``'s."""

    @classmethod
    def from_pretrained(cls, model_path: str, **options: Any) -> Engine:
        name = default_engine()
        if name != "vllm":
            print(
                f"engine auto: vLLM is not installed, generating with {name} (slower; install vllm,"
                f" or pass --engine {name} to choose it)",
                file=sys.stderr,
                flush=True,
            )
        return ENGINES[name].from_pretrained(model_path, **options)


def default_threads(environ: Mapping[str, str] = os.environ, cores: int | None = None) -> int:
    """Decoding threads when ``--threads`` is unset: the cores this process may use (its CPU
    affinity, which taskset, cgroup cpusets and Slurm's ``--cpus-per-task`` narrow), shared among
    the processes a distributed launch starts on this machine (``LOCAL_WORLD_SIZE``), and at most
    ``OMP_NUM_THREADS`` when that is set: a job that splits the cores between parallel workers (or
    torchrun, which sets it to 1) says so there. A generating stage has the cores to itself (rs
    and eval generate, then score; the rlhf loop's trainer and engine take turns), and on 2 idle
    cores 2 threads decode SmolLM2-135M about 2.4x faster than 1; 2 threads on cores another
    process also uses are 5-30x slower a step (sampling.vllm_engine), hence OMP_NUM_THREADS."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = cores // (_positive(environ.get("LOCAL_WORLD_SIZE")) or 1)
    omp = _positive(environ.get("OMP_NUM_THREADS"))
    if omp:
        threads = min(threads, omp)
    return max(1, threads)


def cpu_threads(engine: Engine) -> int | None:
    """The threads an engine decodes with on CPU; None for one on a GPU or one without its own (transformers)."""
    threads = getattr(engine, "threads", None)
    return threads if threads and str(getattr(engine, "device", "cpu")).startswith("cpu") else None


def _positive(value: str | None) -> int | None:
    """``value`` as a positive int, else None (unset, empty or not a number: ignored, as OpenMP does)."""
    try:
        number = int(value) if value else 0
    except ValueError:
        return None
    return number if number > 0 else None


def build_engine(name: str, model_path: str, **options: Any) -> Engine:
    """The engine ``name`` (one of ``ENGINES``: 'auto', 'vllm', 'transformers') serving ``model_path``
    (a ``.gguf`` file is converted once into a Hugging Face folder: ``align.core.gguf.resolve_model_path``)."""
    factory = ENGINES[name]
    return factory.from_pretrained(resolve_model_path(str(model_path)), **options)


@dataclasses.dataclass
class EngineOptions:
    """Engine fields shared by every stage that generates (mixed into stage configs)."""

    engine: str = option(
        "auto",
        "Generation engine; auto: vLLM when it is installed, else transformers (said on stderr).",
        choices=ENGINES,
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "float32", "Engine weights dtype; float32 keeps log-probs equal to the trainer's."
    )
    max_model_len: int = option(512, "Longest prompt + response, in tokens (vLLM sizes its KV pages from it).")
    kv_cache_gb: float | None = option(
        None,
        "vLLM KV-cache size in GiB (on CPU it is host RAM). Too small a cache makes vLLM decode"
        " the sequences in waves; the engine says on stderr when a call needs more and what would fit."
        " Unset, on CPU: what the stage's prompts x num_samples x (prompt + max_tokens) need at once,"
        " within a quarter of the available RAM (rs, eval, rlhf; recorded in stage.json); on a GPU,"
        " what gpu_memory_utilization leaves after the weights.",
    )
    gpu_memory_utilization: float = option(
        0.3,
        "vLLM on a GPU: the share of the GPU's memory the engine may take (weights, activations,"
        " KV cache when kv_cache_gb is unset); in rlhf the policy and its optimizer share the GPU."
        " A memory setting, not part of the stage's identity.",
    )
    tensor_parallel_size: int = option(
        1,
        "vLLM: GPUs one engine is split across. Only 1: every process runs its own engine on its own"
        " GPU (TRL's colocate mode without its tensor-parallel subgroups).",
    )
    max_num_seqs: int = option(
        256, "vLLM: most sequences decoded together (each of the K samples of a prompt counts)."
    )
    kv_block_size: int = option(
        32,
        "vLLM: tokens per KV-cache page (its block_size; a multiple of 32). Prefix caching"
        " shares only full pages, so the K samples of a prompt share its first 32-token pages"
        " and compute only the rest; vLLM's CPU default, 128, shares nothing of a prompt shorter"
        " than 128 tokens (SmolLM2-135M, 64 prompts x K=8: 1.4x the tokens/s, docs/vllm-cpu.md)."
        " A speed setting, not part of the stage's identity.",
    )
    batch_size: int = option(64, "transformers engine: prompts per generate call.")
    threads: int | None = option(
        None,
        "vLLM: torch threads that decode. Unset: the cores this process may use (its CPU affinity),"
        " shared among a distributed launch's processes on the machine (LOCAL_WORLD_SIZE), at most"
        " OMP_NUM_THREADS when that is set; recorded in stage.json. 2 threads decode SmolLM2-135M"
        " about 2.4x faster than 1 on 2 idle cores, and are several times slower on cores other"
        " work uses (docs/vllm-cpu.md): set 1, or OMP_NUM_THREADS, when the cores are shared. A"
        " speed setting, not part of the stage's identity.",
    )
    enforce_eager: bool | None = option(
        None,
        "vLLM: run the model eagerly; false compiles it (torch.compile, and CUDA graphs on a GPU)"
        " when the engine starts, a one-time cost for faster decoding (bench/bench_generation.py"
        " --enforce_eager false). Unset: eager on CPU, compiled on a GPU. A speed setting, not part"
        " of the stage's identity.",
    )
    system_prompt: str | None = option(
        None, "System message put before each prompt that has none (steers tone and format)."
    )
    trust_remote_code: bool = option(False, "Run model code shipped with a Hub repo. Off by default.")

    def validate_engine(self) -> None:
        for key in ("max_model_len", "max_num_seqs", "batch_size", "threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ConfigError(f"'kv_cache_gb' must be > 0, got {self.kv_cache_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"'gpu_memory_utilization' must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size != 1:
            raise ConfigError(
                f"'tensor_parallel_size' must be 1, got {self.tensor_parallel_size}: tensor-parallel engines are not"
                " supported; run one process per GPU (accelerate launch), each with its own engine"
            )
        if self.kv_block_size < 1 or self.kv_block_size % 32:  # vLLM's CPU attention needs it; GPU backends take it
            raise ConfigError(f"'kv_block_size' must be a positive multiple of 32, got {self.kv_block_size}")

    def build_engine(
        self,
        model_path: str,
        seed: int = 0,
        kv_cache_gb: float | None = None,
        work: Workload | None = None,
        **vllm_options: Any,
    ) -> Engine:
        """The configured engine; ``kv_cache_gb`` (rlhf passes the size it resolved) overrides ``self.kv_cache_gb``;
        ``work`` (the prompts, samples and new tokens to come) sizes an unset one on CPU;
        ``vllm_options`` (rlhf's: the engine's dtype, sleep mode, LoRA) override or add to the rest."""
        options = dict(
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            kv_cache_gb=kv_cache_gb or self.kv_cache_gb,
            max_num_seqs=self.max_num_seqs,
            kv_block_size=self.kv_block_size,
            batch_size=self.batch_size,
            threads=self.threads or default_threads(),
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=self.enforce_eager,
            system_prompt=self.system_prompt,
            trust_remote_code=self.trust_remote_code,
            seed=seed,
            work=work,
        )
        return build_engine(self.engine, model_path, **{**options, **vllm_options})
