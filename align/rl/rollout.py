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


def length_groups(attention_mask: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, int]]:
    """Rows in groups of ``batch_size``, longest first, each with its own longest length:
    ``[(row indices, width), ...]``."""
    lengths = attention_mask.sum(-1)
    order = torch.argsort(lengths, descending=True)
    return [(idx, int(lengths[idx].max())) for idx in order.split(batch_size)]


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
        return forward_logprobs(model, input_ids, attention_mask, with_hidden)
    groups = length_groups(attention_mask, batch_size)
    if sum(len(idx) * w for idx, w in groups) > 0.75 * rows * width:
        return forward_logprobs(model, input_ids, attention_mask, with_hidden)
    parts = []
    for idx, w in groups:
        logp, entropy, hidden = forward_logprobs(model, input_ids[idx, :w], attention_mask[idx, :w], with_hidden)
        pad = width - w  # back to [rows, width - 1]; the padded targets are masked out anyway
        parts.append((F.pad(logp, (0, pad)), F.pad(entropy, (0, pad)), F.pad(hidden, (0, 0, 0, pad)) if with_hidden else None))
    inverse = torch.argsort(torch.cat([idx for idx, _ in groups]))
    logp = torch.cat([p[0] for p in parts])[inverse]
    entropy = torch.cat([p[1] for p in parts])[inverse]
    hidden = torch.cat([p[2] for p in parts])[inverse] if with_hidden else None
    return logp, entropy, hidden


def backward_by_groups(model, input_ids, attention_mask, grad_logp: torch.Tensor,
                       grad_hidden: torch.Tensor | None, batch_size: int) -> None:
    """Accumulate the parameters' gradients of a loss whose gradient with respect to the per-token
    log-probs (``grad_logp`` [B, L-1]; and the hidden states, ``grad_hidden``) is known, one
    length group of ``batch_size`` rows at a time (``loss.backward`` reaching ``model``'s
    parameters through every row at once, by the chain rule).

    Why: one backward through the whole batch keeps every row's activations alive at once (30
    layers x rows x tokens: ~19 GB for SmolLM2-135M at 64 rows of ~100 tokens); here at most
    ``batch_size`` rows hold activations. The price is one more forward pass per step (the
    gradient with respect to the log-probs comes from a pass without gradients first).
    """
    for idx, w in length_groups(attention_mask, batch_size):
        logp, _, hidden = forward_logprobs(model, input_ids[idx, :w], attention_mask[idx, :w], grad_hidden is not None,
                                          with_entropy=False)
        outputs, grads = [logp], [grad_logp[idx, : w - 1]]
        if grad_hidden is not None:
            outputs.append(hidden)
            grads.append(grad_hidden[idx, : w - 1])
        torch.autograd.backward(outputs, grads)


def forward_logprobs(model, input_ids, attention_mask, with_hidden: bool, with_entropy: bool = True):
    """One forward pass of all the rows: ``(logp, entropy | None, hidden | None)``, as ``token_logprobs``."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_hidden)
    logits = out.logits[:, :-1]
    logp = selective_logprobs(logits, input_ids[:, 1:])
    entropy = chunked_entropy(logits) if with_entropy else None
    hidden = out.hidden_states[-1][:, :-1] if with_hidden else None
    return logp, entropy, hidden


# Positions per chunk in the two functions below: 1,024 x 49,152 x 4 bytes = 200 MB of fp32
# temporaries at a time at SmolLM2's vocabulary, whatever the batch.
CHUNK_TOKENS = 1024


def _chunks(logits: torch.Tensor, chunk_tokens: int):
    """(row, position slice) chunks of [B, T, V] logits, each a view (no copy of the logits)."""
    for row in range(logits.shape[0]):
        for start in range(0, logits.shape[1], chunk_tokens):
            yield row, slice(start, start + chunk_tokens)


def selective_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """log softmax(logits)[target] per position, [B, T, V] x [B, T] -> [B, T] fp32, with gradients.

    The same numbers as ``log_softmax(logits.float()).gather(targets)`` without the full-vocabulary
    fp32 log-softmax (B x T x V x 4 bytes, 1.6 GB for 64 x 128 tokens at a 49k vocabulary) and
    without keeping one for the backward pass: the forward keeps only logsumexp per position,
    and the backward writes softmax-minus-one-hot chunk by chunk into the one gradient tensor.
    TRL's ``selective_log_softmax`` loops over rows for the forward the same way.
    """
    return _SelectiveLogprobs.apply(logits, targets, chunk_tokens)


class _SelectiveLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, chunk_tokens):
        logp = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        for row, cols in _chunks(logits, chunk_tokens):
            chunk = logits[row, cols].float()
            lse[row, cols] = torch.logsumexp(chunk, dim=-1)
            logp[row, cols] = chunk.gather(-1, targets[row, cols].unsqueeze(-1)).squeeze(-1) - lse[row, cols]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_tokens = chunk_tokens
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for row, cols in _chunks(logits, ctx.chunk_tokens):
            g = grad_logp[row, cols].unsqueeze(-1)
            chunk = -(logits[row, cols].float() - lse[row, cols].unsqueeze(-1)).exp() * g  # -softmax * g
            chunk.scatter_add_(-1, targets[row, cols].unsqueeze(-1), g)  # + one-hot * g
            grad[row, cols] = chunk
        return grad, None, None


@torch.no_grad()  # a statistic only: no graph for it
def chunked_entropy(logits: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Entropy of softmax(logits) per position, [B, T, V] -> [B, T] fp32, in chunks:
    H = logsumexp(x) - sum softmax(x) * x."""
    entropy = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
    for row, cols in _chunks(logits, chunk_tokens):
        chunk = logits[row, cols].float()
        lse = torch.logsumexp(chunk, dim=-1)
        entropy[row, cols] = lse - (torch.softmax(chunk, dim=-1) * chunk).sum(-1)
    return entropy
