"""Rollouts: the token batch an optimizer trains on, built from the engine's candidates.

Each prompt has K candidates; row ``i * K + k`` of every tensor is candidate k of prompt i.
Sequences are prompt ids + the response ids exactly as the engine sampled them, right-padded:
a response that stopped ends with the stop token the policy chose (the tokenizer's EOS or any
other id of the model's ``generation_config.eos_token_id``, e.g. Gemma-2's ``<end_of_turn>``), and
nothing is ever appended, so every trained token is one the policy sampled. ``mask`` marks the
response tokens as targets of the shifted log-probs, i.e. ``mask[:, t]`` is 1 when token
``t + 1`` of the sequence is a response token; ``truncated`` marks the responses cut at
``max_tokens`` (no stop token).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from sampling.logprobs import chunked_entropy, pad_batch, selective_logprobs


@dataclasses.dataclass
class Rollouts:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    mask: torch.Tensor  # [B, L-1] response-token targets
    scores: torch.Tensor  # [B] reward from the scorers
    k: int  # samples per prompt
    truncated: torch.Tensor | None = None  # [B] bool: cut at max_tokens before a stop token
    full_mask: torch.Tensor | None = None  # [B, L-1] every response token, where ``mask`` leaves rows out of the loss
    logp_old: torch.Tensor | None = None  # [B, L-1] under the policy that sampled
    logp_ref: torch.Tensor | None = None  # [B, L-1] under the reference
    values_old: torch.Tensor | None = None  # [B, L-1] value head (PPO)
    logp_engine: torch.Tensor | None = (
        None  # [B, L-1] under the engine that sampled (importance sampling), 0 off the mask
    )
    is_weights: torch.Tensor | None = (
        None  # importance-sampling weights of the loss ([B, L-1] per token or [B] per sequence)
    )

    @property
    def n_prompts(self) -> int:
        return self.scores.shape[0] // self.k

    def grouped(self, values: torch.Tensor) -> torch.Tensor:
        """[B] -> [n_prompts, K]."""
        return values.view(self.n_prompts, self.k)

    @property
    def response_mask(self) -> torch.Tensor:
        """Every response token, rows left out of the loss included (``mask_truncated``): the mask of
        the per-sequence quantities that feed rewards and advantages (KL shaping) and of statistics."""
        return self.mask if self.full_mask is None else self.full_mask


def build_rollouts(
    prompt_ids: list[list[int]],
    responses: list[list[list[int]]],
    truncated: list[list[bool]],
    scores: list[float],
    pad_id: int,
    device: str | torch.device = "cpu",
    engine_logprobs: list[list[list[float]]] | None = None,
) -> Rollouts:
    """Pack K responses per prompt (the sampled ids, nothing added) into padded tensors;
    ``truncated[i][k]`` says response k of prompt i hit ``max_tokens`` (``finish_reason == "length"``);
    ``engine_logprobs[i][k]`` (optional) are the engine's log-probs of response k's tokens, put where
    ``mask`` marks them (``logp_engine``)."""
    seqs, spans = [], []
    for ids, cands in zip(prompt_ids, responses):
        for resp in cands:
            seqs.append(list(ids) + list(resp))
            spans.append((len(ids), len(ids) + len(resp)))
    input_ids, attention = pad_batch(seqs, pad_id)
    mask = torch.zeros((len(seqs), input_ids.shape[1] - 1), dtype=torch.float32)
    for row, (start, end) in enumerate(spans):
        mask[row, start - 1 : end - 1] = 1.0
    k = len(responses[0])
    cut = torch.tensor([t for row in truncated for t in row], dtype=torch.bool, device=device)
    logp_engine = None
    if engine_logprobs is not None:
        logp_engine = torch.zeros_like(mask)
        for row, (lps, (start, end)) in enumerate(zip((lp for cands in engine_logprobs for lp in cands), spans)):
            logp_engine[row, start - 1 : end - 1] = torch.tensor(lps, dtype=torch.float32)
        logp_engine = logp_engine.to(device)
    return Rollouts(
        input_ids.to(device),
        attention.to(device),
        mask.to(device),
        torch.tensor(scores, dtype=torch.float32, device=device),
        k,
        truncated=cut,
        logp_engine=logp_engine,
    )


def penalize_missing_eos(scores: torch.Tensor, truncated: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """``scores`` with ``penalty`` subtracted from the truncated responses' (a new tensor; ``None``:
    unchanged). TRL's ``missing_eos_penalty`` (OnlineDPOConfig): ``rewards[~contain_eos] -= penalty``."""
    if penalty is None:
        return scores
    return scores - penalty * truncated.to(scores.dtype)


def mask_truncated(r: Rollouts) -> Rollouts:
    """``r`` with the truncated rows' ``mask`` zeroed, so they carry no loss; their scores stay in
    the group statistics, and ``full_mask`` keeps every response token for the quantities that feed
    the advantages and the statistics (``response_mask``).

    TRL's ``mask_truncated_completions`` (GRPOConfig/RLOOConfig; DAPO's overlong filtering, Yu et
    al. 2025) zeroes these rows of ``completion_mask`` too. Departure: TRL then uses that one mask
    for the KL it subtracts from RLOO's rewards and for its logged KL, so a truncated response enters
    its group's baseline with no KL penalty; here its KL is counted as for any other response.
    """
    keep = (~r.truncated).to(r.mask.dtype)[:, None]
    return dataclasses.replace(r, mask=r.mask * keep, full_mask=r.response_mask)


def truncation_view(r: Rollouts, mask_rows: bool, missing_eos_penalty: float | None) -> Rollouts:
    """The rollouts an optimizer trains on under the two options for responses cut at
    ``max_tokens``: the penalty taken off their rewards, then (``mask_rows``) their loss masked."""
    r = dataclasses.replace(r, scores=penalize_missing_eos(r.scores, r.truncated, missing_eos_penalty))
    return mask_truncated(r) if mask_rows else r


def length_groups(attention_mask: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, int]]:
    """Rows in groups of ``batch_size``, longest first, each with its own longest length:
    ``[(row indices, width), ...]``."""
    lengths = attention_mask.sum(-1)
    order = torch.argsort(lengths, descending=True)
    return [(idx, int(lengths[idx].max())) for idx in order.split(batch_size)]


def token_logprobs(
    model,
    input_ids,
    attention_mask,
    with_hidden: bool = False,
    batch_size: int | None = None,
    temperature: float = 1.0,
):
    """Per-token log-probs of each next token, their entropies, and optionally the last hidden states,
    under the policy that samples at ``temperature`` (softmax of the logits divided by it, as TRL's
    GRPO/RLOO trainers compute them): the distribution the rollouts were drawn from.

    Returns ``(logp [B, L-1], entropy [B, L-1], hidden [B, L-1, H] | None)``. With ``batch_size``,
    the (right-padded) rows go through the model in passes of that many rows grouped by length,
    each cut to its own longest row: the same numbers (padding never reaches a real token under
    the causal mask) for far less work when lengths vary, as with real prompts. TRL's online
    trainers pad the whole batch to its longest row instead. When grouping would save less than
    a quarter of the padded tokens (lengths nearly equal), one pass is cheaper and is used.
    """
    rows, width = input_ids.shape
    if batch_size is None or batch_size >= rows:
        return forward_logprobs(model, input_ids, attention_mask, with_hidden, temperature=temperature)
    groups = length_groups(attention_mask, batch_size)
    if sum(len(idx) * w for idx, w in groups) > 0.75 * rows * width:
        return forward_logprobs(model, input_ids, attention_mask, with_hidden, temperature=temperature)
    parts = []
    for idx, w in groups:
        logp, entropy, hidden = forward_logprobs(
            model, input_ids[idx, :w], attention_mask[idx, :w], with_hidden, temperature=temperature
        )
        pad = width - w  # back to [rows, width - 1]; the padded targets are masked out anyway
        parts.append(
            (F.pad(logp, (0, pad)), F.pad(entropy, (0, pad)), F.pad(hidden, (0, 0, 0, pad)) if with_hidden else None)
        )
    inverse = torch.argsort(torch.cat([idx for idx, _ in groups]))
    logp = torch.cat([p[0] for p in parts])[inverse]
    entropy = torch.cat([p[1] for p in parts])[inverse]
    hidden = torch.cat([p[2] for p in parts])[inverse] if with_hidden else None
    return logp, entropy, hidden


def backward_by_groups(
    model,
    input_ids,
    attention_mask,
    grad_logp: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    batch_size: int,
    temperature: float = 1.0,
) -> None:
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
        logp, _, hidden = forward_logprobs(
            model,
            input_ids[idx, :w],
            attention_mask[idx, :w],
            grad_hidden is not None,
            with_entropy=False,
            temperature=temperature,
        )
        outputs, grads = [logp], [grad_logp[idx, : w - 1]]
        if grad_hidden is not None:
            outputs.append(hidden)
            grads.append(grad_hidden[idx, : w - 1])
        torch.autograd.backward(outputs, grads)


def forward_logprobs(
    model, input_ids, attention_mask, with_hidden: bool, with_entropy: bool = True, temperature: float = 1.0
):
    """One forward pass of all the rows: ``(logp, entropy | None, hidden | None)``, as ``token_logprobs``."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_hidden)
    logits = out.logits[:, :-1]
    logp = selective_logprobs(logits, input_ids[:, 1:], temperature=temperature)
    entropy = chunked_entropy(logits, temperature=temperature) if with_entropy else None
    hidden = out.hidden_states[-1][:, :-1] if with_hidden else None
    return logp, entropy, hidden
