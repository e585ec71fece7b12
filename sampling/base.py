"""The engine protocol shared by the vLLM and transformers engines, and the engine registry.

An engine turns chat prompts into K candidates each. Both engines follow the same contract:

* prompts are rendered with the policy's own chat template (plus an optional system prompt, as
  Llama 3 used to steer tone and format) and passed to the model as token ids;
* ``Candidate.token_ids`` are the generated ids, ending with the EOS id when generation stopped
  there (an RL loss must see the policy choose to stop); ``Candidate.text`` is their decoded text
  without special tokens;
* ``Candidate.token_ids`` end with the stop token the model chose when it stopped: the
  tokenizer's EOS or any other id of the model's ``generation_config.eos_token_id`` (a chat
  model's end of turn, e.g. Gemma-2's ``<end_of_turn>``): both engines stop on every one of them;
* ``Candidate.logprobs`` (on request) are the log-probs of the sampled tokens under the
  distribution they were sampled from (the logits divided by the temperature, then top-k/top-p),
  i.e. what a trainer's forward pass computes for the same tokens at the same temperature;
* with ``SamplingParams.seed`` set, a call is reproducible: prompt ``i`` has the seed key
  ``seed + i`` (so a caller passing ``seed + offset`` for a slice of a prompt set gets the same
  candidates however it slices), or ``seeds[i]`` when a caller gives one key per prompt
  (``align rs --shard``: a prompt keeps its key in whichever part it lands). A key is not used as
  a seed directly: vLLM seeds sample ``k`` of a request seeded ``s`` with ``s + k``, so with
  seeds ``seed + i``, (prompt i, sample k) and (prompt i + 1, sample k - 1) would draw the same
  random stream. ``stream_seed`` hashes each key to a seed with 16 zero low bits, so each prompt
  owns a block of 65,536 streams and two prompts share one only if their hashes collide in the
  high 47 bits. The transformers engine seeds each batch (with ``seeds``, by its first prompt's
  key: per prompt at batch size 1), hashed the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Protocol

from align.core.errors import DataError
from align.core.registry import Registry


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
        """The seed of the ``i``-th prompt of a call (None: unseeded): its key, ``seeds[i]`` or
        ``seed + i``, hashed by ``stream_seed``."""
        if self.seeds is not None:
            return stream_seed(self.seeds[i])
        return None if self.seed is None else stream_seed(self.seed + i)


STREAM_BITS = 16  # low bits left to the samples of one prompt: up to 65,536 per prompt
_MASK64 = 2**64 - 1


def stream_seed(key: int) -> int:
    """A seed for the prompt with seed key ``key``: SplitMix64 (Steele et al. 2014, the finalizer
    of Java's SplittableRandom) of the key, cut to 63 bits with its low ``STREAM_BITS`` zeroed.

    Nearby keys (``seed + i``) map to unrelated seeds, and every seed leaves the ``seed + k``
    that vLLM gives a request's k-th sample inside the prompt's own block.
    """
    z = (key + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 1) & ~(2**STREAM_BITS - 1)


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


_TURN_MARKER = "ALIGNTURNMARKER"


def turn_end_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (None: none, or no template).

    Found by rendering a conversation whose answer is a marker and reading the first token after
    it: ``<|im_end|>`` for Qwen2/SmolLM2, ``<end_of_turn>`` for Gemma 2, ``<|eot_id|>`` for Llama 3.
    A base model's EOS is often another token (Qwen2.5 base: ``<|endoftext|>``), so an engine that
    stopped only on the EOS would write the next turn too.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": _TURN_MARKER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that needs other roles or raises on these: no end of turn to learn
        return None
    if _TURN_MARKER not in text:
        return None
    after = tokenizer(text.split(_TURN_MARKER, 1)[1], add_special_tokens=False)["input_ids"]
    if not after:
        return None
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(after[0])
    special = after[0] in tokenizer.all_special_ids or bool(added is not None and added.special)
    return after[0] if special else None


def stop_ids(tokenizer, generation_eos: int | list[int] | None = None) -> list[int]:
    """Every id generation stops on: the tokenizer's EOS, the ids of a model's
    ``generation_config.eos_token_id`` (an int or a list), and the chat template's end of turn."""
    extra = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    ids = [i for i in [tokenizer.eos_token_id, *extra, turn_end_id(tokenizer)] if i is not None]
    return list(dict.fromkeys(ids))


def render_prompts(tokenizer, prompts: list[list[dict]], system_prompt: str | None = None) -> list[str]:
    """Render chat prompts with the policy's template, ready for the assistant's turn."""
    rendered = []
    for messages in prompts:
        if system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


@dataclasses.dataclass(frozen=True)
class Workload:
    """The generate calls an engine is built for: their prompts (chat messages), samples per prompt
    and new tokens. The vLLM engine sizes an unset KV cache on CPU to hold them at once
    (``sampling.vllm_engine.work_kv_cache_gb``); the transformers engine has no use for it."""

    prompts: list[list[dict]]
    n: int
    max_tokens: int


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
