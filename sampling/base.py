"""The engine protocol shared by the vLLM and transformers engines."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Protocol


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` means greedy; ``n`` candidates per prompt."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False


@dataclasses.dataclass
class Candidate:
    """One generated response: its text, token ids, why it stopped, and optional log-probs."""

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None


class Engine(Protocol):
    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Candidate]]:
        """K = params.n candidates for each prompt (a list of chat messages), in prompt order."""

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Replace the weights (Hugging Face parameter names) used by later generate calls."""


def render_prompts(tokenizer, prompts: list[list[dict]], system_prompt: str | None = None) -> list[str]:
    """Render chat prompts with the policy's template, ready for the assistant's turn."""
    rendered = []
    for messages in prompts:
        if system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered
