"""sampling/cpu_sampler.py: the CPU sampler draws softmax(logits) exactly, never a masked token,
reproducibly per seeded row; the vLLM engine uses it (its seeded-sampling tests: test_sampling.py)."""

from __future__ import annotations

import math

import pytest
import torch

from sampling.cpu_sampler import sample_rows, uniforms


def _frequencies(logits_row: torch.Tensor, draws: int, chunk: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    rows = logits_row.expand(draws, -1).clone()
    tokens = sample_rows(rows, torch.rand(draws, dtype=torch.float64), chunk=chunk)
    return torch.bincount(tokens, minlength=logits_row.numel()).double() / draws


@pytest.mark.parametrize("vocab,chunk", [(1000, 256), (768, 256), (5, 256), (700, 1)])
def test_draws_follow_the_softmax_within_sampling_error(vocab, chunk):
    """Mass in the tail chunk (1000 = 3 x 256 + 232), a whole number of chunks, a vocabulary smaller
    than one chunk, and one-entry chunks; 60,000 draws per row, each frequency within 5 standard errors."""
    torch.manual_seed(1)
    logits = torch.randn(vocab) * 2
    logits[vocab - 1] = 4.0  # the last entry (the tail chunk's end) carries real mass
    p = logits.softmax(-1).double()
    draws = 60_000
    freq = _frequencies(logits, draws, chunk)
    bound = 5 * torch.sqrt(p * (1 - p) / draws) + 1e-4
    assert torch.all((freq - p).abs() <= bound), float(((freq - p).abs() - bound).max())
    assert freq[vocab - 1] == pytest.approx(float(p[vocab - 1]), abs=float(bound[vocab - 1]))


def test_masked_tokens_are_never_drawn_even_at_the_ends_of_u():
    """top-k/top-p leave -inf; u = 0 picks the first live token, u just below 1 the last one, even
    when the last chunks of the row are all masked (rounding must not push the draw into them)."""
    vocab = 1000
    logits = torch.full((4, vocab), float("-inf"))
    live = [3, 257, 300, 511]
    logits[:, live] = torch.tensor([0.5, 1.0, -2.0, 3.0])
    u = torch.tensor([0.0, 1 - 2**-53, 0.5, 1 - 1e-15], dtype=torch.float64)
    tokens = sample_rows(logits.clone(), u)
    assert tokens.tolist()[:2] == [3, 511]
    assert set(tokens.tolist()) <= set(live)
    many = sample_rows(logits[:1].expand(20_000, -1).clone(), torch.rand(20_000, dtype=torch.float64))
    assert set(many.unique().tolist()) == set(live)


def test_a_row_is_its_inverse_cdf_at_u():
    """Deterministic given u: the first token whose running probability exceeds u."""
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    for u, token in [(0.05, 0), (0.15, 1), (0.29, 1), (0.31, 2), (0.61, 3), (0.99, 3)]:
        assert sample_rows(logits.clone(), torch.tensor([u], dtype=torch.float64), chunk=2).item() == token


def test_seeded_rows_draw_from_their_own_generator_wherever_they_sit_in_the_batch():
    def seeded(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    alone = uniforms(1, {0: seeded(7)})
    in_batch = uniforms(5, {3: seeded(7), 1: seeded(8)})
    assert in_batch[3] == alone[0] and in_batch[1] != alone[0]
    assert in_batch.dtype == torch.float64 and bool(((in_batch >= 0) & (in_batch < 1)).all())
    generator = seeded(7)
    assert uniforms(1, {0: generator})[0] == alone[0] and uniforms(1, {0: generator})[0] != alone[0]  # a stream


def test_the_vllm_engine_samples_with_it_and_can_keep_vllms_own(sft_vllm, monkeypatch):
    from sampling import cpu_sampler

    assert sft_vllm.sampler == "align"
    monkeypatch.setenv("ALIGN_VLLM_SAMPLER", "vllm")
    assert cpu_sampler.install(sft_vllm.llm) is False


def test_its_draws_agree_with_vllm_logprobs(sft_vllm):
    """Through the engine: 4,000 one-token samples of one prompt, against the probabilities vLLM
    reports for the tokens drawn (its raw log-probs: temperature 1, no top-k/top-p)."""
    from sampling import SamplingParams

    n = 4000
    out = sft_vllm.generate(
        [[{"role": "user", "content": "12+34="}]],
        SamplingParams(n=n, temperature=1.0, max_tokens=1, seed=5, logprobs=True),
    )[0]
    counts: dict[int, int] = {}
    prob: dict[int, float] = {}
    for c in out:
        counts[c.token_ids[0]] = counts.get(c.token_ids[0], 0) + 1
        prob[c.token_ids[0]] = math.exp(c.logprobs[0])
    for token, count in counts.items():
        p = prob[token]
        assert abs(count / n - p) <= 5 * math.sqrt(p * (1 - p) / n) + 2e-3, (token, count / n, p)
    assert sum(prob.values()) > 0.95  # the tokens drawn carry nearly all the mass
