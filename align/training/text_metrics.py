"""What shows a gain in a judge's score is not degenerate text: length, diversity, naturalness.

A policy optimized against a learned reward can raise the reward with text that says less:
repeated phrases, one stock answer for every prompt, or long strings the base model would never
write. ``align eval`` reports, beside its scores:

* ``mean_length``: response tokens per answer;
* ``distinct_2``: distinct word bigrams over all bigrams of all answers (Li et al. 2016, "A
  Diversity-Promoting Objective Function for Neural Conversation Models"), corpus-level; words are
  the lower-cased whitespace-split text, so the figure does not depend on the tokenizer;
* ``reference_nll``: the mean per-token negative log-likelihood of the answers under a reference
  model (e.g. the base the policy started from), the prompt rendered with the reference's own chat
  template; a rise means the policy writes text the reference finds unlikely (the KL side of
  Gao et al. 2022's over-optimization picture, measured on held-out prompts).
"""

from __future__ import annotations

from typing import Any


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams / all word n-grams over ``texts`` (0.0 when there are none)."""
    grams = [
        tuple(words[i : i + n]) for words in (t.lower().split() for t in texts) for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def reference_nll(
    model_path: str,
    prompts: list[list[dict[str, Any]]],
    responses: list[str],
    system_prompt: str | None = None,
    batch_size: int = 16,
) -> float:
    """Mean per-token NLL of ``responses`` (text, re-tokenized) after their ``prompts`` under the
    causal LM at ``model_path`` (fp32, on CPU, no gradients); responses with no tokens are skipped."""
    import torch

    from align.rl.rollout import build_rollouts, token_logprobs
    from align.training.models import ModelOptions, load_causal_lm, load_tokenizer
    from sampling.base import encode_prompts

    opts = ModelOptions(model_name_or_path=model_path, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(opts)
    kept = [(p, r) for p, r in zip(prompts, responses) if r]
    if not kept:
        return 0.0
    prompt_ids = encode_prompts(tokenizer, [p for p, _ in kept], system_prompt)
    response_ids = [[tokenizer(r, add_special_tokens=False)["input_ids"]] for _, r in kept]
    model = load_causal_lm(opts).eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(kept), batch_size):
            part = slice(start, start + batch_size)
            rollouts = build_rollouts(
                prompt_ids[part],
                response_ids[part],
                [[False]] * len(prompt_ids[part]),
                [0.0] * len(prompt_ids[part]),
                tokenizer.pad_token_id,
            )
            logp = token_logprobs(model, rollouts.input_ids, rollouts.attention_mask)[0]
            total -= float((logp * rollouts.mask).sum())
            count += float(rollouts.mask.sum())
    return total / count if count else 0.0


__all__ = ["distinct_n", "reference_nll"]
