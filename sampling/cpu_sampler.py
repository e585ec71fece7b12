"""Random sampling for vLLM's CPU backend by inverting the CDF, chunk by chunk.

vLLM 0.32 samples on CPU with a fused Gumbel-max kernel (``torch.ops._C.fused_gumbel_argmax``):
one SplitMix64 draw, two logarithms and a compare for every entry of the logits. On
SmolLM2-135M (64 prompts x K=8 decoded together) that is 87-89 ms per decode step for 512 x 49,152
logits on 2 threads of an Intel Xeon (AVX-512), ~9% of a compiled step, as long as the LM head's
matmul that made the logits. One uniform number per row is enough to sample exactly: token ``i``
is drawn where the row's running sum of ``exp(logit - max)`` first exceeds ``u * total``.
A whole-row ``cumsum`` costs about as much as the Gumbel kernel (a sequential pass, 49k adds per
row), so :func:`sample_rows` sums the row in chunks of 256 (a vectorized reduction), finds the
chunk with a prefix sum over ~190 chunk sums, and takes the running sum inside that chunk only:
in place, it reads the logits about three times: 11.9 vs 83.7 ms for the same 512 x 49,152
(bench/bench_sampler.py; docs/vllm-cpu.md section 13).

The draw is the same distribution, not the same numbers: a seeded request is as reproducible as
under vLLM's kernel (one uniform from the request's own generator per step, so a row's draws do
not depend on which other requests share its batch), but a seed gives other samples than it does
in stock vLLM. :func:`install` puts it in an engine's sampler (only for an engine on the CPU, where
vLLM would use its CPU kernel, and not for ``use_fp64_gumbel``); ``ALIGN_VLLM_SAMPLER=vllm`` keeps vLLM's own.
"""

from __future__ import annotations

import os
from typing import Any

import torch

CHUNK = 256


def uniforms(batch: int, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One uniform in [0, 1) per row (float64): from the row's own generator where the request is
    seeded (vLLM keys ``generators`` by row), else from torch's global one."""
    u = torch.rand(batch, dtype=torch.float64)
    for row, generator in generators.items():
        u[row] = torch.rand(1, dtype=torch.float64, generator=generator)
    return u


def sample_rows(logits: torch.Tensor, u: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Token index per row, drawn with probability ``softmax(logits)`` by inverting the CDF at ``u``.

    ``logits`` (rows x vocab, fp32) is overwritten (with ``exp(logits - max)``). Entries of ``-inf``
    (masked by top-k/top-p) have probability 0 and are never drawn: the chosen chunk and the chosen
    entry are the first whose running sum exceeds the target, and the target is kept below the
    total even where rounding would push it to the end.
    """
    rows, vocab = logits.shape
    whole = vocab // chunk * chunk
    e = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    sums = [e[:, :whole].unflatten(1, (whole // chunk, chunk)).sum(-1)] if whole else []
    if whole < vocab:
        sums.append(e[:, whole:].sum(-1, keepdim=True))
    cum = torch.cat(sums, dim=1).double().cumsum_(dim=-1)
    total = cum[:, -1:]
    target = torch.minimum(u.view(rows, 1) * total, total * (1 - 1e-12))
    j = torch.searchsorted(cum, target, right=True).clamp_(max=cum.shape[1] - 1)
    before = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(target))
    cols = j * chunk + torch.arange(chunk)
    inside = e.gather(1, cols.clamp(max=vocab - 1)).masked_fill_(cols >= vocab, 0).double().cumsum_(dim=-1)
    rest = torch.minimum(target - before, inside[:, -1:] * (1 - 1e-12))
    i = torch.searchsorted(inside, rest, right=True).clamp_(max=chunk - 1)
    return cols.gather(1, i).squeeze(1)


def install(llm: Any, device: str = "cpu") -> bool:
    """Use :func:`sample_rows` in the (in-process) engine ``llm``'s sampler; True where installed.
    Only for an engine on the CPU (``device``): a GPU engine keeps vLLM's own sampler, untouched."""
    if device != "cpu" or os.environ.get("ALIGN_VLLM_SAMPLER", "align") == "vllm":
        return False
    return bool(llm.collective_rpc(_install_in_worker)[0])


def _install_in_worker(worker: Any) -> bool:
    """Replace the CPU sampling kernel in ``worker``'s sampler; False, changing nothing, where the
    worker is not on the CPU or its runner lacks the sampler this expects (vLLM's Model Runner V2
    has no ``sampler.topk_topp_sampler``)."""
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler, apply_top_k_top_p

    device = getattr(worker, "device", None)
    if device is not None and torch.device(device).type != "cpu":
        return False
    runner_sampler = getattr(getattr(worker, "model_runner", None), "sampler", None)
    sampler = getattr(runner_sampler, "topk_topp_sampler", None)
    if sampler is None or not hasattr(runner_sampler, "sample"):
        return False
    if getattr(sampler.forward, "__func__", None) is not TopKTopPSampler.forward_cpu or getattr(
        sampler, "use_fp64_gumbel", True
    ):
        return False
    # vLLM's forward_cpu computes the processed log-probs (a full-vocabulary log_softmax) at every
    # step in "processed_logprobs" mode, though vLLM reads them only for requests that ask for
    # log-probs; ours computes them only for a step that has such a request.
    step = {"logprobs": True}
    sample = runner_sampler.sample

    def sample_noting_logprobs(logits: torch.Tensor, sampling_metadata: Any, *args: Any, **kwargs: Any):
        step["logprobs"] = sampling_metadata.max_num_logprobs is not None or bool(sampling_metadata.logprob_token_ids)
        return sample(logits, sampling_metadata, *args, **kwargs)

    def forward(
        logits: torch.Tensor, generators: dict[int, torch.Generator], k: torch.Tensor | None, p: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # vLLM's forward_cpu, with its fused Gumbel kernel replaced by sample_rows.
        logits = apply_top_k_top_p(logits, k, p)
        returned = None
        if sampler.logprobs_mode == "processed_logits" and step["logprobs"]:
            returned = logits.clone()
        elif sampler.logprobs_mode == "processed_logprobs" and step["logprobs"]:
            returned = logits.log_softmax(dim=-1, dtype=torch.float32)
        u = uniforms(logits.shape[0], generators)
        return sample_rows(logits.to(torch.float32), u), returned

    runner_sampler.sample = sample_noting_logprobs
    sampler.forward = forward
    return True
