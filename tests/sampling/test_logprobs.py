"""Token log-probs and entropies in chunks: the naive full-vocabulary numbers, without its memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.rl.rollout import chunked_entropy, selective_logprobs

VOCAB = 49152  # SmolLM2's vocabulary


def naive(logits, targets):
    logp_all = F.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def test_chunked_equals_naive_values_and_gradients():
    torch.manual_seed(0)
    logits = (torch.randn(3, 37, 1000) * 4).requires_grad_()
    targets = torch.randint(0, 1000, (3, 37))
    weights = torch.randn(3, 37)
    ref_logp, ref_entropy = naive(logits, targets)
    (ref_grad,) = torch.autograd.grad((ref_logp * weights).sum(), logits)
    for chunk in (1, 5, 37, 1024):  # chunk edges inside, at and past the row
        logp = selective_logprobs(logits, targets, chunk_tokens=chunk)
        (grad,) = torch.autograd.grad((logp * weights).sum(), logits)
        torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            chunked_entropy(logits, chunk_tokens=chunk), ref_entropy.detach(), atol=1e-5, rtol=0
        )
    assert not chunked_entropy(logits).requires_grad


def test_chunked_on_sliced_bf16_logits():
    """The RL loop passes logits[:, :-1] (a non-contiguous view), possibly in bf16."""
    torch.manual_seed(1)
    full = torch.randn(2, 9, 300, dtype=torch.bfloat16)
    targets = torch.randint(0, 300, (2, 8))
    logp = selective_logprobs(full[:, :-1], targets, chunk_tokens=3)
    ref_logp, ref_entropy = naive(full[:, :-1], targets)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked_entropy(full[:, :-1], chunk_tokens=3), ref_entropy, atol=1e-5, rtol=0)


def saved_bytes(fn, logits, targets) -> int:
    """Bytes autograd keeps for the backward pass of fn's log-probs (storages other than the logits')."""
    storages: dict[int, int] = {}
    own = logits.untyped_storage().data_ptr()

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() != own:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp = fn(logits, targets)
    logp.sum().backward()
    return sum(storages.values())


def allocations(fn, *args) -> list[int]:
    """Sizes of the new storages the ops allocate while fn runs (the logits' own storage and
    views of it excluded): a CPU stand-in for torch.cuda.max_memory_allocated."""
    from torch.utils._python_dispatch import TorchDispatchMode

    own = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    sizes: dict[int, int] = {}  # storage -> bytes: views of a new tensor count once

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in own:
                    sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return out

    with Watch():
        fn(*args)
    return list(sizes.values())


def test_memory_at_a_real_vocabulary():
    """[2, 64, 49152] fp32 logits are 25 MB. The naive path allocates full-size fp32 tensors in
    the forward and keeps one for backward; the chunked one allocates at most a chunk at a time
    and keeps [B, T] numbers; its backward allocates only the full-size gradient itself."""
    torch.manual_seed(0)
    logits = torch.randn(2, 64, VOCAB).requires_grad_()
    targets = torch.randint(0, VOCAB, (2, 64))
    full, chunk = logits.numel() * 4, 16 * VOCAB * 4

    def naive_logp(x, t):
        return naive(x, t)[0]

    def chunked(x, t):
        return selective_logprobs(x, t, chunk_tokens=16)

    assert saved_bytes(naive_logp, logits, targets) >= full  # the check fails on the naive version
    assert saved_bytes(chunked, logits, targets) < 0.01 * full
    with torch.no_grad():
        assert max(allocations(naive_logp, logits, targets)) >= full
        assert max(allocations(chunked, logits, targets)) <= chunk
        assert max(allocations(lambda x: naive(x, targets)[1], logits)) >= full
        assert max(allocations(lambda x: chunked_entropy(x, chunk_tokens=16), logits)) <= chunk

    def backward(fn):
        logits.grad = None
        logp = fn(logits, targets)
        return allocations(lambda: logp.sum().backward())

    naive_big = sum(size >= full for size in backward(naive_logp))  # 3 or 4, by torch's kernel choice
    big = [size for size in backward(chunked) if size > chunk]
    assert big == [full, full]  # the gradient and (under the watch) its copy into .grad, nothing else
    assert naive_big > len(big)  # the check fails on the naive version


def test_temperature_scales_the_logits_in_values_gradients_and_entropy():
    """The RL loss scores the policy that sampled: softmax(logits / T), chunked like T = 1."""
    torch.manual_seed(2)
    logits = (torch.randn(2, 11, 500) * 3).requires_grad_()
    targets = torch.randint(0, 500, (2, 11))
    weights = torch.randn(2, 11)
    for temperature in (0.7, 1.3):
        ref_logp, ref_entropy = naive(logits / temperature, targets)
        (ref_grad,) = torch.autograd.grad((ref_logp * weights).sum(), logits)
        logp = selective_logprobs(logits, targets, chunk_tokens=4, temperature=temperature)
        (grad,) = torch.autograd.grad((logp * weights).sum(), logits)
        torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=0)
        entropy = chunked_entropy(logits, chunk_tokens=4, temperature=temperature)
        torch.testing.assert_close(entropy, ref_entropy.detach(), atol=1e-5, rtol=0)
    before = logits.detach().clone()
    selective_logprobs(logits.detach(), targets, temperature=0.5)
    assert torch.equal(logits.detach(), before)  # fp32 logits are divided out of place
