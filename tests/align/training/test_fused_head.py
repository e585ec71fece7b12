"""TRL's fused LM head set up for CPU (align/training/fused_head.py): labelled positions only, same numbers."""

from __future__ import annotations

import pytest
import torch

from align.training.fused_head import TOKENS_PER_TILE, VOCAB_PER_TILE, tune_fused_lm_head_for_cpu


@pytest.fixture
def restored_trl(monkeypatch):
    """TRL's module-wide settings as they are now, put back after the test."""
    import trl.kernels.chunked_logprob as kernels
    import trl.trainer.utils as trl_utils

    for module, name in (
        (trl_utils, "_use_triton"),
        (trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"),
        (trl_utils, "_ChunkedLogProbFunction"),
        (kernels, "TOKEN_CHUNK_SIZE"),
    ):
        monkeypatch.setattr(module, name, getattr(module, name))
    return trl_utils, kernels


def test_tuning_finds_trls_private_names_and_is_idempotent(restored_trl):
    trl_utils, kernels = restored_trl
    assert tune_fused_lm_head_for_cpu() is True  # False would mean a TRL upgrade moved the names
    decide = trl_utils._use_triton
    assert tune_fused_lm_head_for_cpu() is True and trl_utils._use_triton is decide  # not wrapped twice
    assert decide(torch.device("cpu")) is True  # labelled positions only, on CPU
    assert kernels._use_triton(torch.device("cpu")) is False  # the kernels still fold tiles in torch here
    assert not torch.cuda.is_available()  # this suite's machines: the CPU tiles apply
    assert (trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, kernels.TOKEN_CHUNK_SIZE) == (VOCAB_PER_TILE, TOKENS_PER_TILE)


def test_fused_head_scores_labelled_positions_only_with_the_full_logits_numbers(restored_trl, tiny_model):
    """Log-probs and gradients equal the plain full-logits computation (float64 reference), and
    the head projects exactly the positions whose next-token label is not -100."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    trl_utils, kernels = restored_trl
    tune_fused_lm_head_for_cpu()
    kernels.TOKEN_CHUNK_SIZE = 7  # several token tiles and vocabulary tiles even on the tiny model
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = 13
    projected = []
    original = trl_utils._ChunkedLogProbFunction

    class Counting:
        @staticmethod
        def apply(hidden, *args):
            projected.append(hidden.shape[0])
            return original.apply(hidden, *args)

    trl_utils._ChunkedLogProbFunction = Counting

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32")
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (3, 20))
    labels = ids.clone()
    labels[:, :8] = -100  # prompt
    labels[2, 15:] = -100  # padding of the shortest row
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    shifted = labels[:, 1:]
    mask = shifted != -100
    assert projected == [int(mask.sum())] == [2 * 12 + 7]  # 19 shifted labels, 7 prompt ones masked

    out.log_probs.sum().backward()
    fused_grad = model.model.norm.weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=ids).logits[:, :-1]
    plain = torch.log_softmax(logits.double(), -1).gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    plain = plain.masked_fill(~mask, 0)
    torch.testing.assert_close(out.log_probs.double(), plain, atol=1e-5, rtol=0)
    assert bool((out.log_probs[~mask] == 0).all()) and bool((out.log_probs[mask] < 0).all())
    plain.sum().backward()
    torch.testing.assert_close(fused_grad, model.model.norm.weight.grad, atol=1e-4, rtol=1e-4)
    p = torch.softmax(logits.double(), -1)
    entropy = -(p * p.log()).sum(-1).masked_fill(~mask, 0)
    torch.testing.assert_close(out.entropy.double(), entropy, atol=1e-5, rtol=0)
