"""Rollouts: the token batch an optimizer trains on, built from the engine's candidates.

Each prompt has K candidates; row ``i * K + k`` of every tensor is candidate k of prompt i.
Sequences are prompt ids + response ids (+ EOS when the response stopped on it), right-padded;
``mask`` marks the response tokens as targets of the shifted log-probs, i.e. ``mask[:, t]``
is 1 when token ``t + 1`` of the sequence is a response token.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Rollouts:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    mask: torch.Tensor  # [B, L-1] response-token targets
    scores: torch.Tensor  # [B] reward from the scorers
    k: int  # samples per prompt
    logp_old: torch.Tensor | None = None  # [B, L-1] under the policy that sampled
    logp_ref: torch.Tensor | None = None  # [B, L-1] under the reference
    values_old: torch.Tensor | None = None  # [B, L-1] value head (PPO)

    @property
    def n_prompts(self) -> int:
        return self.scores.shape[0] // self.k

    def grouped(self, values: torch.Tensor) -> torch.Tensor:
        """[B] -> [n_prompts, K]."""
        return values.view(self.n_prompts, self.k)


def build_rollouts(prompt_ids: list[list[int]], responses: list[list[list[int]]], finished: list[list[bool]],
                   scores: list[float], eos_id: int, pad_id: int, device: str | torch.device = "cpu") -> Rollouts:
    """Pack K responses per prompt into padded tensors (EOS appended to responses that stopped)."""
    seqs, spans = [], []
    for ids, cands, stops in zip(prompt_ids, responses, finished):
        for resp, stopped in zip(cands, stops):
            resp = list(resp)
            if stopped and (not resp or resp[-1] != eos_id):
                resp.append(eos_id)
            seqs.append(list(ids) + resp)
            spans.append((len(ids), len(ids) + len(resp)))
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for row, (seq, (start, end)) in enumerate(zip(seqs, spans)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        mask[row, start - 1 : end - 1] = 1.0
    k = len(responses[0])
    return Rollouts(input_ids.to(device), attention.to(device), mask.to(device),
                    torch.tensor(scores, dtype=torch.float32, device=device), k)


def token_logprobs(model, input_ids, attention_mask, with_hidden: bool = False, batch_size: int | None = None):
    """Per-token log-probs of each next token, their entropies, and optionally the last hidden states.

    Returns ``(logp [B, L-1], entropy [B, L-1], hidden [B, L-1, H] | None)``. With ``batch_size``,
    the (right-padded) rows go through the model in passes of that many rows grouped by length,
    each cut to its own longest row: the same numbers (padding never reaches a real token under
    the causal mask) for far less work when lengths vary, as with real prompts. TRL's online
    trainers pad the whole batch to its longest row instead. When grouping would save less than
    a quarter of the padded tokens (lengths nearly equal), one pass is cheaper and is used.
    """
    rows, width = input_ids.shape
    if batch_size is None or batch_size >= rows:
        return _token_logprobs(model, input_ids, attention_mask, with_hidden)
    lengths = attention_mask.sum(-1)
    order = torch.argsort(lengths, descending=True)
    groups = order.split(batch_size)
    widths = [int(lengths[idx].max()) for idx in groups]
    if sum(len(idx) * w for idx, w in zip(groups, widths)) > 0.75 * rows * width:
        return _token_logprobs(model, input_ids, attention_mask, with_hidden)
    parts = []
    for idx, w in zip(groups, widths):
        logp, entropy, hidden = _token_logprobs(model, input_ids[idx, :w], attention_mask[idx, :w], with_hidden)
        pad = width - w  # back to [rows, width - 1]; the padded targets are masked out anyway
        parts.append((F.pad(logp, (0, pad)), F.pad(entropy, (0, pad)), F.pad(hidden, (0, 0, 0, pad)) if with_hidden else None))
    inverse = torch.argsort(order)
    logp = torch.cat([p[0] for p in parts])[inverse]
    entropy = torch.cat([p[1] for p in parts])[inverse]
    hidden = torch.cat([p[2] for p in parts])[inverse] if with_hidden else None
    return logp, entropy, hidden


def _token_logprobs(model, input_ids, attention_mask, with_hidden: bool):
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_hidden)
    logits = out.logits[:, :-1].float()
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # a statistic only: no graph for it
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    hidden = out.hidden_states[-1][:, :-1] if with_hidden else None
    return logp, entropy, hidden
