"""Generation with plain transformers ``generate``: the fallback where vLLM is unavailable.

Batched with left padding, sorted by prompt length so batches waste little padding; the K
samples of a prompt come from ``num_return_sequences`` (each re-computes the prompt: no shared
KV pages, which is much of why vLLM is faster). Batch ``b`` is seeded with ``seed + b`` (with
per-prompt ``seeds``, with its first prompt's seed: see ``_batch_seed``).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from sampling.base import ENGINES, Candidate, SamplingParams, encode_prompts, stop_ids, stream_seed
from sampling.logprobs import pad_batch, selective_logprobs


@ENGINES.register("transformers")
class TransformersEngine:
    name = "transformers"

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 64,
        system_prompt: str | None = None,
        max_model_len: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self.max_model_len = max_model_len
        # What generation stops on, as the vLLM engine's (read once: it renders the chat template).
        self.stop_ids = stop_ids(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None))

    @classmethod
    def from_pretrained(
        cls,
        model_path: str,
        *,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        batch_size: int = 64,
        system_prompt: str | None = None,
        max_model_len: int | None = None,
        **_: Any,
    ) -> "TransformersEngine":
        """Load the policy and its tokenizer; engine options meant for vLLM are ignored."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=getattr(torch, dtype) if dtype != "auto" else "auto",
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, tok, batch_size=batch_size, system_prompt=system_prompt, max_model_len=max_model_len)

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Candidate]]:
        encoded = encode_prompts(self.tokenizer, prompts, self.system_prompt, self.max_model_len)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[list[Candidate]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            for b, start in enumerate(range(0, len(order), self.batch_size)):
                idx = order[start : start + self.batch_size]
                seed = _batch_seed(params, b, idx[0])
                if seed is not None:
                    torch.manual_seed(seed)
                for i, cands in zip(idx, self._generate_batch([encoded[i] for i in idx], params)):
                    results[i] = cands
        finally:
            self.model.train(was_training)
        return results

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams) -> list[list[Candidate]]:
        tok = self.tokenizer
        pad = tok.pad_token_id
        input_ids, attention = pad_batch(batch, pad, left=True)
        width = input_ids.shape[1]
        device = next(self.model.parameters()).device
        greedy = params.temperature == 0
        max_new = params.max_tokens
        if self.max_model_len is not None:
            max_new = min(max_new, self.max_model_len - width)
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy or not params.top_k else params.top_k,
            num_return_sequences=params.n,
            pad_token_id=pad,
            eos_token_id=self.stop_ids,
            stop_strings=list(params.stop) or None,
            tokenizer=tok if params.stop else None,
            output_scores=params.logprobs,
            return_dict_in_generate=True,
        )
        new = out.sequences[:, width:].tolist()
        logprobs = _sampled_logprobs(out.scores, out.sequences[:, width:]) if params.logprobs else None
        grouped: list[list[Candidate]] = []
        for row in range(len(batch)):
            cands = []
            for k in range(params.n):
                flat = row * params.n + k
                ids, reason = _trim(new[flat], self.stop_ids, pad)
                text = tok.decode(ids, skip_special_tokens=True)
                text, reason = _cut_at_stop(text, reason, params.stop)
                lp = logprobs[flat][: len(ids)] if logprobs is not None else None
                cands.append(Candidate(text, ids, reason, lp))
            grouped.append(cands)
        return grouped

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        state = dict(named_tensors)
        missing = set(state) - set(self.model.state_dict())
        if missing:
            raise ValueError(f"unknown parameter names: {sorted(missing)[:3]}")
        self.model.load_state_dict(state, strict=False)

    def close(self) -> None:
        self.model = None


def _batch_seed(params: SamplingParams, batch: int, first: int) -> int | None:
    """Batch ``batch`` is seeded from the key ``seed + batch``, or, when the caller gives one key per
    prompt, from its first prompt's: at ``batch_size=1`` every prompt then has its own seed, so its
    candidates do not depend on which other prompts share the call (``align rs --shard``). Keys
    are hashed by ``stream_seed`` as the vLLM engine's are."""
    if params.seeds is not None:
        return stream_seed(params.seeds[first])
    return None if params.seed is None else stream_seed(params.seed + batch)


def _trim(ids: list[int], stops: list[int], pad: int) -> tuple[list[int], str]:
    """Cut after the first stop id (kept, as vLLM keeps it) and report why generation stopped."""
    at = next((n for n, i in enumerate(ids) if i in stops), None)
    if at is not None:
        return ids[: at + 1], "stop"
    while ids and ids[-1] == pad and pad not in stops:
        ids = ids[:-1]
    return ids, "length"


def _cut_at_stop(text: str, reason: str, stop: tuple[str, ...]) -> tuple[str, str]:
    """Drop a stop string and what follows it from the text, as vLLM does."""
    cuts = [text.index(s) for s in stop if s in text]
    return (text[: min(cuts)], "stop") if cuts else (text, reason)


def _sampled_logprobs(scores: tuple[torch.Tensor, ...], sampled: torch.Tensor) -> list[list[float]]:
    """Log-probs of the sampled tokens under the processed scores generate sampled from (the logits
    divided by the temperature, then top-k/top-p: vLLM's ``processed_logprobs``), step by step,
    never the full-vocabulary log-softmax of every step at once."""
    steps = [selective_logprobs(s.unsqueeze(0), sampled[None, :, i])[0] for i, s in enumerate(scores)]
    return torch.stack(steps, dim=1).tolist()
