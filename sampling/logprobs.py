"""Log-probabilities and entropies of tokens from [B, T, V] logits, a chunk of positions at a time.

One implementation serves both sides: the transformers engine reports the log-probs of the tokens
it sampled (``sampling.hf``), and training takes the log-probs, with gradients, and the entropies
of its rollouts (``align.rl.rollout``). ``pad_batch`` makes the padded batches of token ids they
all feed a model.
"""

from __future__ import annotations

import torch

# Positions per chunk in the two functions below: 1,024 x 49,152 x 4 bytes = 200 MB of fp32
# temporaries at a time at SmolLM2's vocabulary, whatever the batch.
CHUNK_TOKENS = 1024


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one [N, longest] batch: ``input_ids`` filled out with ``pad_id`` on the
    right (on the left with ``left=True``, as generation wants) and ``attention_mask``, 1 on the
    tokens and 0 on the padding; both long, on the CPU."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        input_ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids, attention_mask


def _chunks(logits: torch.Tensor, chunk_tokens: int):
    """(row, position slice) chunks of [B, T, V] logits, each a view (no copy of the logits)."""
    for row in range(logits.shape[0]):
        for start in range(0, logits.shape[1], chunk_tokens):
            yield row, slice(start, start + chunk_tokens)


def selective_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per position, [B, T, V] x [B, T] -> [B, T] fp32, with
    gradients. The division happens chunk by chunk in fp32 (no scaled copy of the logits).

    The same numbers as ``log_softmax(logits.float()).gather(targets)`` without the full-vocabulary
    fp32 log-softmax (B x T x V x 4 bytes, 1.6 GB for 64 x 128 tokens at a 49k vocabulary) and
    without keeping one for the backward pass: the forward keeps only logsumexp per position,
    and the backward writes softmax-minus-one-hot chunk by chunk into the one gradient tensor.
    TRL's ``selective_log_softmax`` loops over rows for the forward the same way.
    """
    return _SelectiveLogprobs.apply(logits, targets, chunk_tokens, float(temperature))


class _SelectiveLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, chunk_tokens, temperature):
        logp = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        for row, cols in _chunks(logits, chunk_tokens):
            chunk = _scaled(logits[row, cols], temperature)
            lse[row, cols] = torch.logsumexp(chunk, dim=-1)
            logp[row, cols] = chunk.gather(-1, targets[row, cols].unsqueeze(-1)).squeeze(-1) - lse[row, cols]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_tokens, ctx.temperature = chunk_tokens, temperature
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for row, cols in _chunks(logits, ctx.chunk_tokens):
            g = grad_logp[row, cols].unsqueeze(-1) / ctx.temperature  # d(x / T)/dx = 1/T
            chunk = (
                -(_scaled(logits[row, cols], ctx.temperature) - lse[row, cols].unsqueeze(-1)).exp() * g
            )  # -softmax * g
            chunk.scatter_add_(-1, targets[row, cols].unsqueeze(-1), g)  # + one-hot * g
            grad[row, cols] = chunk
        return grad, None, None, None


def _scaled(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """A chunk of logits in fp32, divided by the temperature out of place (``.float()`` of fp32
    logits is the logits themselves)."""
    return chunk.float() if temperature == 1.0 else chunk.float() / temperature


@torch.no_grad()  # a statistic only: no graph for it
def chunked_entropy(logits: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, [B, T, V] -> [B, T] fp32, in chunks:
    H = logsumexp(x) - sum softmax(x) * x with x = logits / temperature."""
    entropy = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
    for row, cols in _chunks(logits, chunk_tokens):
        chunk = _scaled(logits[row, cols], temperature)
        lse = torch.logsumexp(chunk, dim=-1)
        entropy[row, cols] = lse - (torch.softmax(chunk, dim=-1) * chunk).sum(-1)
    return entropy
