"""A reward model as a scorer: a sequence-classification model with its own tokenizer.

    scorer = build_scorer("model:runs/rm/model")        # what `align rm` writes, or any HF seq-cls folder
    scorer.score(["12+34="], ["46"], [{}])               # -> [reward]

Text in, floats out: the policy's outputs are decoded text, re-rendered here with the reward
model's own chat template (or, for an encoder with no template, ``prompt + "\\n" + response``)
and tokenized with its own tokenizer, so a reward model with another tokenizer than the policy
is the normal case. ``encode`` is the single rendering used both by training (``align rm``) and
by scoring, so the two can't drift apart.

Scoring sorts the sequences by length and batches neighbours, so each batch pads to nearly its
own length (bench/bench_rm_scoring.py measures the gain over fixed-order batches); results are
returned in input order. The reward is output 0 of the classification head (label "reward");
further outputs, if any, are AFM grade heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from align.core.errors import ModelError
from sampling.logprobs import pad_batch

REWARD_LABEL = "reward"


def prompt_messages(prompt: str, row: dict[str, Any]) -> list[dict]:
    """The chat to score a response against: the row's ``prompt`` messages when it carries
    them (system prompt and earlier turns included), else the prompt text as one user turn."""
    messages = row.get("prompt")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        return messages
    return [{"role": "user", "content": prompt}]


def render(tokenizer, prompt: list[dict], response: list[dict]) -> str:
    """The text a reward model reads: prompt + response through its chat template, or
    ``prompt text \\n response text`` when the tokenizer has none (encoders like MiniLM)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([*prompt, *response], tokenize=False)
    return "\n".join(m["content"] for m in prompt) + "\n" + "".join(m["content"] for m in response)


def encode(tokenizer, prompt: list[dict], response: list[dict], max_length: int) -> list[int]:
    """Token ids of ``render(...)``; a longer text loses its beginning (the prompt's start first),
    keeping the final token a decoder reward model reads its score from. Templated text gets no
    extra special tokens (the template has them); plain text gets the tokenizer's ([CLS]/[SEP])."""
    text = render(tokenizer, prompt, response)
    templated = bool(getattr(tokenizer, "chat_template", None))
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        ids = tokenizer(text, add_special_tokens=not templated, truncation=True, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = side
    return list(ids)


def length_batches(lengths: list[int], batch_size: int, sort: bool = True) -> list[list[int]]:
    """Index batches of at most ``batch_size``: by descending length (minimal padding) or, with
    ``sort=False``, in input order (the naive baseline the benchmark compares against)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class RewardModel:
    """Scores (prompt, response) text with a sequence-classification model (output 0)."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str = "model",
        batch_size: int = 32,
        max_length: int = 1024,
        sort_by_length: bool = True,
    ):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:  # decoders find the last non-pad token with it
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.max_length = max_length
        self.sort_by_length = sort_by_length

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str = "auto", dtype: str = "float32", **kwargs: Any
    ) -> "RewardModel":
        """Load a folder written by ``align rm`` (or any Hugging Face sequence-classification
        model) with its tokenizer; safetensors only, no remote code."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(
                f"reward model not found: {path} has no config.json (give the model/ folder written by `align rm`)"
            )
        config = AutoConfig.from_pretrained(path)
        if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
            raise ModelError(
                f"{path} is not a reward model (architectures: {', '.join(config.architectures or ['none'])});"
                " train one with `align rm` or give a sequence-classification folder"
            )
        torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False
        )
        model.to(_resolve_device(device)).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, name=f"model:{path}", **kwargs)

    def score(self, prompts: list[str], responses: list[str], rows: list[dict[str, Any]]) -> list[float]:
        """The Scorer protocol: one reward per (prompt, response) text."""
        chats = [prompt_messages(p, row) for p, row in zip(prompts, rows)]
        return self.score_messages(chats, [[{"role": "assistant", "content": r}] for r in responses])

    def score_messages(self, prompts: list[list[dict]], responses: list[list[dict]]) -> list[float]:
        """Rewards of responses (message lists) to chat prompts."""
        ids = [encode(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses)]
        return self.score_ids(ids)

    @torch.no_grad()
    def score_ids(self, ids: list[list[int]]) -> list[float]:
        """Rewards of tokenized sequences, batched by length, returned in input order."""
        scores = [0.0] * len(ids)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        for batch in length_batches([len(x) for x in ids], self.batch_size, self.sort_by_length):
            input_ids, mask = pad_batch([ids[i] for i in batch], pad)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            for row, i in enumerate(batch):
                scores[i] = float(logits[row, 0])
        return scores


__all__ = ["REWARD_LABEL", "RewardModel", "encode", "length_batches", "prompt_messages", "render"]
