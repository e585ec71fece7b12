"""Generation with plain transformers ``generate``: the fallback where vLLM is unavailable.

Batched with left padding, sorted by prompt length so batches waste little padding.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from sampling.base import Candidate, SamplingParams, render_prompts


class TransformersEngine:
    def __init__(self, model, tokenizer, batch_size: int = 64, system_prompt: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.system_prompt = system_prompt

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Candidate]]:
        texts = render_prompts(self.tokenizer, prompts, self.system_prompt)
        encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[list[Candidate]] = [[] for _ in prompts]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                for i, cands in zip(idx, self._generate_batch([encoded[i] for i in idx], params)):
                    results[i] = cands
        finally:
            self.model.train(was_training)
        return results

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams) -> list[list[Candidate]]:
        tok = self.tokenizer
        width = max(len(ids) for ids in batch)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        device = next(self.model.parameters()).device
        greedy = params.temperature == 0
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=params.max_tokens,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy or not params.top_k else params.top_k,
            num_return_sequences=params.n,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
            output_scores=params.logprobs,
            return_dict_in_generate=True,
        )
        new = out.sequences[:, width:].tolist()
        logprobs = _sampled_logprobs(out) if params.logprobs else None
        grouped: list[list[Candidate]] = []
        for row in range(len(batch)):
            cands = []
            for k in range(params.n):
                flat = row * params.n + k
                ids, reason = _trim(new[flat], tok.eos_token_id, pad)
                lp = logprobs[flat][: len(ids)] if logprobs is not None else None
                cands.append(Candidate(tok.decode(ids, skip_special_tokens=True), ids, reason, lp))
            grouped.append(cands)
        return grouped

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        state = dict(named_tensors)
        self.model.load_state_dict(state, strict=False)


def _trim(ids: list[int], eos: int, pad: int) -> tuple[list[int], str]:
    """Cut at the first EOS (dropping it, as vLLM does) and report why generation stopped."""
    if eos in ids:
        return ids[: ids.index(eos)], "stop"
    while ids and ids[-1] == pad and pad != eos:
        ids = ids[:-1]
    return ids, "length"


def _sampled_logprobs(out) -> list[list[float]]:
    steps = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
    width = out.sequences.shape[1] - steps.shape[1]
    chosen = out.sequences[:, width:].unsqueeze(-1)
    return steps.gather(-1, chosen).squeeze(-1).tolist()
