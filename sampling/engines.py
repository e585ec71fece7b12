"""Build an engine by name from a stage config: the options every generating stage shares.

``engine: auto`` picks vLLM whenever it imports, else transformers ``generate``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from align.config import option
from align.errors import ConfigError
from sampling import hf, vllm_engine  # noqa: F401  register the engines
from sampling.base import ENGINES, Engine, unknown_name

def default_engine() -> str:
    """'vllm' when it imports (CPU or GPU build), else 'transformers'."""
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. the torchvision trap in stack.md)
        return "transformers"
    return "vllm"


def build_engine(name: str, model_path: str, **options: Any) -> Engine:
    """The engine ``name`` ('auto', 'vllm', 'transformers') serving ``model_path``."""
    if name == "auto":
        name = default_engine()
    if name not in ENGINES:
        raise unknown_name("engine", name, ["auto", *ENGINES])
    from align.models import resolve_model_path

    return ENGINES[name].from_pretrained(resolve_model_path(str(model_path)), **options)


@dataclasses.dataclass
class EngineOptions:
    """Engine fields shared by every stage that generates (mixed into stage configs)."""

    engine: str = option("auto", "Generation engine: 'vllm', 'transformers', or 'auto' (vLLM whenever it imports).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("float32", "Engine weights dtype; float32 keeps log-probs equal to the trainer's.")
    max_model_len: int = option(512, "Longest prompt + response, in tokens (vLLM sizes its KV pages from it).")
    kv_cache_gb: float = option(1.0, "vLLM KV-cache size in GiB (on CPU it is host RAM).")
    max_num_seqs: int = option(256, "vLLM: most sequences decoded together (each of the K samples of a prompt counts).")
    batch_size: int = option(64, "transformers engine: prompts per generate call.")
    system_prompt: str | None = option(None, "System message put before each prompt that has none (steers tone and format).")
    trust_remote_code: bool = option(False, "Run model code shipped with a Hub repo. Off by default.")

    def validate_engine(self) -> None:
        if self.engine != "auto" and self.engine not in ENGINES:
            raise unknown_name("engine", self.engine, ["auto", *ENGINES])
        for key in ("max_model_len", "max_num_seqs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if self.kv_cache_gb <= 0:
            raise ConfigError(f"'kv_cache_gb' must be > 0, got {self.kv_cache_gb}")

    def build_engine(self, model_path: str, seed: int = 0) -> Engine:
        return build_engine(
            self.engine, model_path, dtype=self.dtype, max_model_len=self.max_model_len,
            kv_cache_gb=self.kv_cache_gb, max_num_seqs=self.max_num_seqs, batch_size=self.batch_size, system_prompt=self.system_prompt,
            trust_remote_code=self.trust_remote_code, seed=seed,
        )
