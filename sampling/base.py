"""The engine protocol shared by the vLLM and transformers engines, and the engine registry.

An engine turns chat prompts into K candidates each. Both engines follow the same contract:

* prompts are rendered with the policy's own chat template (plus an optional system prompt, as
  Llama 3 used to steer tone and format) and passed to the model as token ids;
* ``Candidate.token_ids`` are the generated ids, ending with the EOS id when generation stopped
  there (an RL loss must see the policy choose to stop); ``Candidate.text`` is their decoded text
  without special tokens;
* ``Candidate.logprobs`` (on request) are the log-probs of the sampled tokens under the model's
  own distribution (temperature 1, before top-p/top-k), i.e. what a trainer's forward pass
  computes for the same tokens;
* with ``SamplingParams.seed`` set, a call is reproducible: the vLLM engine samples prompt ``i``
  with seed ``seed + i`` (so a caller passing ``seed + offset`` for a slice of a prompt set gets
  the same candidates however it slices), or ``seeds[i]`` when a caller gives one seed per prompt
  (``align rs --shard``: a prompt keeps its seed in whichever part it lands); the transformers
  engine seeds each batch (with ``seeds``, by its first prompt's: per prompt at batch size 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Protocol

from align.errors import DataError
from align.registry import Registry


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` means greedy; ``n`` candidates per prompt; ``top_k=0`` is off."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    seeds: tuple[int, ...] | None = None  # one per prompt of the call; overrides seed + i (vLLM engine)

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"n and max_tokens must be >= 1, got n={self.n}, max_tokens={self.max_tokens}")

    def prompt_seed(self, i: int) -> int | None:
        """The seed of the ``i``-th prompt of a call (None: unseeded)."""
        if self.seeds is not None:
            return self.seeds[i]
        return None if self.seed is None else self.seed + i


@dataclasses.dataclass
class Candidate:
    """One generated response: its text, token ids, why it stopped, and optional log-probs."""

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None


class Engine(Protocol):
    name: str  # the ENGINES name it is registered under (what stage.json records)
    tokenizer: Any

    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Candidate]]:
        """K = params.n candidates for each prompt (a list of chat messages), in prompt order."""

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Replace the weights (Hugging Face parameter names) used by later generate calls."""

    def close(self) -> None:
        """Free the engine's memory (and, for vLLM, its worker state)."""


def render_prompts(tokenizer, prompts: list[list[dict]], system_prompt: str | None = None) -> list[str]:
    """Render chat prompts with the policy's template, ready for the assistant's turn."""
    rendered = []
    for messages in prompts:
        if system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


def encode_prompts(
    tokenizer, prompts: list[list[dict]], system_prompt: str | None = None, max_model_len: int | None = None
) -> list[list[int]]:
    """Token ids of the rendered prompts (the template already holds the special tokens).

    A prompt that leaves no room for one generated token within ``max_model_len`` is a DataError
    naming its position, rather than a failure deep inside the engine.
    """
    texts = render_prompts(tokenizer, prompts, system_prompt)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if max_model_len is not None:
        for i, ids in enumerate(encoded):
            if len(ids) >= max_model_len:
                raise DataError(
                    f"prompt #{i} has {len(ids)} tokens, which leaves no room to generate within"
                    f" max_model_len={max_model_len}; raise --max_model_len or shorten the prompt"
                )
    return encoded


# Engine registry: name -> class with ``from_pretrained(model_path, **options)``.
ENGINES: Registry[Any] = Registry("engine")
