"""Prompt selection shared by the generation and online-RL benchmarks.

Both run their engines with a 512-token context, so both take the first prompts that fit it
with the response budget to spare; by default from the real Alpaca instructions beside the
project (../shared/data/real), which are read, never copied in.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_PROMPTS = ROOT.parent / "shared" / "data" / "real" / "alpaca_en_demo.json"
CONTEXT = 512  # max_model_len of every engine in the benchmarks


def default_dataset() -> str:
    """The real Alpaca prompts when present, else ``demo`` (the a+b= task)."""
    return str(REAL_PROMPTS) if REAL_PROMPTS.is_file() else "demo"


def fitting_rows(dataset: str, model: str | Path, n: int, max_tokens: int) -> list[tuple[dict, int]]:
    """(prompt row, prompt tokens) for the first ``n`` rows of ``dataset`` whose prompt, in
    ``model``'s chat template, leaves ``max_tokens`` free in the context."""
    from transformers import AutoTokenizer

    from align.training.evaluation import load_prompts
    from sampling.base import encode_prompts

    rows = load_prompts(dataset)
    lengths = [
        len(ids) for ids in encode_prompts(AutoTokenizer.from_pretrained(model), [r["prompt"] for r in rows], None)
    ]
    return [(r, n_tok) for r, n_tok in zip(rows, lengths) if n_tok + max_tokens <= CONTEXT][:n]
