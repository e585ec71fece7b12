"""The demo task: two-digit addition.

A prompt is one user message whose content is exactly ``f"{a}+{b}="`` with ``a, b`` in 0..99,
and the answer is ``str(a + b)``. The ``question`` style asks the same sum in words, as a chat model
is asked ("What is 12+34? Answer with the number only."), for real models that answer in
sentences (judge those with the ``numeric_answer`` rule). ``write_demo_data`` writes every dataset the pipeline needs
(SFT conversations, RL prompts, preference pairs and a held-out test set) as JSONL. A tiny model
learns the task in minutes on a CPU, so every stage can be run and checked end to end.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
from typing import Iterable

from align.core.errors import ConfigError, DataError
from align.core.registry import Registry

DEMO_PROMPT_RE = re.compile(r"^(\d{1,2})\+(\d{1,2})=$")
NUM_OPERANDS = 100  # a and b range over 0..99
ALL_PAIRS = [(a, b) for a in range(NUM_OPERANDS) for b in range(NUM_OPERANDS)]


# Prompt styles: name -> the user message for ``a + b`` (a format string).
PROMPT_STYLES: Registry[str] = Registry("prompt style")
PROMPT_STYLES.register("equation", "{a}+{b}=")
PROMPT_STYLES.register("question", "What is {a}+{b}? Answer with the number only.")


def prompt_text(a: int, b: int, style: str = "equation") -> str:
    """The user message for ``a + b`` in ``style`` (a key of ``PROMPT_STYLES``)."""
    return PROMPT_STYLES[style].format(a=a, b=b)


def prompt_id(a: int, b: int) -> str:
    """A stable id for the prompt ``a + b``, e.g. ``add_12_34``."""
    return f"add_{a:02d}_{b:02d}"


def answer_of(text: str) -> str:
    """The correct answer to a demo prompt such as ``"12+34="`` (here ``"46"``)."""
    m = DEMO_PROMPT_RE.match(text.strip())
    if not m:
        raise DataError(f"not a demo prompt (expected e.g. '12+34='): {text!r}")
    return str(int(m.group(1)) + int(m.group(2)))


def wrong_answer(a: int, b: int, rng: random.Random) -> str:
    """A plausible wrong answer to ``a + b``: off by one or ten, a dropped carry, swapped digits.

    Never the correct answer and never negative.
    """
    s = a + b
    # s - 10 is also what forgetting the carry from the ones into the tens gives.
    candidates = {s - 1, s + 1, s - 10, s + 10}
    if s >= 100:  # forgot the carry into the hundreds
        candidates.add(s - 100)
    digits = str(s)
    if len(digits) >= 2:  # swapped the last two digits
        candidates.add(int(digits[:-2] + digits[-1] + digits[-2]))
    valid = sorted(c for c in candidates if c >= 0 and c != s)
    return str(rng.choice(valid))


def _user(a: int, b: int, style: str) -> list[dict]:
    return [{"role": "user", "content": prompt_text(a, b, style)}]


def _prompt_row(a: int, b: int, style: str) -> dict:
    return {"prompt": _user(a, b, style), "answer": str(a + b), "prompt_id": prompt_id(a, b)}


def _write_jsonl(path: pathlib.Path, rows: Iterable[dict]) -> None:
    """Write rows as JSONL atomically (a temp file in the same folder, then ``os.replace``)."""
    # Opened by name (not mkstemp) so the file gets the usual umask permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_demo_data(
    output_dir,
    seed: int = 0,
    num_test: int = 200,
    num_prompts: int = 1000,
    num_pairs: int = 2000,
    style: str = "equation",
) -> dict[str, pathlib.Path]:
    """Write the addition datasets to ``output_dir`` and return their paths by name.

    - ``sft.jsonl``: ``{"messages": [user, assistant]}`` for every pair not held out, shuffled.
    - ``prompts.jsonl``: ``{"prompt", "answer", "prompt_id"}`` for ``num_prompts`` training pairs.
    - ``test.jsonl``: the same shape for ``num_test`` held-out pairs, used by no training file.
    - ``pairs.jsonl``: ``{"prompt", "chosen", "rejected"}`` with a plausible wrong ``rejected``
      answer; training pairs are reused in turn when ``num_pairs`` exceeds their number.

    The same arguments give byte-identical files. The held-out set depends only on ``seed`` and
    ``num_test`` (not on ``style``, so both styles hold out the same sums).
    """
    PROMPT_STYLES[style]  # an unknown style: ConfigError naming the valid ones
    total = len(ALL_PAIRS)
    counts = {"num_test": num_test, "num_prompts": num_prompts, "num_pairs": num_pairs}
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    if num_test >= total:
        raise ConfigError(f"num_test must be below {total} (the number of a+b pairs), got {num_test}")
    if num_prompts > total - num_test:
        raise ConfigError(
            f"num_prompts ({num_prompts}) exceeds the {total - num_test} pairs left after "
            f"holding out num_test={num_test}"
        )

    # Separate generators per file so that, e.g., changing num_pairs leaves the others unchanged.
    split = list(ALL_PAIRS)
    random.Random(f"{seed}:split").shuffle(split)
    test, train = split[:num_test], split[num_test:]

    sft = list(train)
    random.Random(f"{seed}:sft").shuffle(sft)
    prompts = random.Random(f"{seed}:prompts").sample(train, num_prompts)
    pair_rng = random.Random(f"{seed}:pairs")
    pair_order = list(train)
    pair_rng.shuffle(pair_order)
    pairs = [pair_order[i % len(pair_order)] for i in range(num_pairs)]

    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("sft", "prompts", "test", "pairs")}
    _write_jsonl(
        paths["sft"],
        ({"messages": _user(a, b, style) + [{"role": "assistant", "content": str(a + b)}]} for a, b in sft),
    )
    _write_jsonl(paths["prompts"], (_prompt_row(a, b, style) for a, b in prompts))
    _write_jsonl(paths["test"], (_prompt_row(a, b, style) for a, b in sorted(test)))
    _write_jsonl(
        paths["pairs"],
        (
            {
                "prompt": _user(a, b, style),
                "chosen": [{"role": "assistant", "content": str(a + b)}],
                "rejected": [{"role": "assistant", "content": wrong_answer(a, b, pair_rng)}],
            }
            for a, b in pairs
        ),
    )
    return paths


__all__ = [
    "DEMO_PROMPT_RE",
    "PROMPT_STYLES",
    "answer_of",
    "prompt_id",
    "prompt_text",
    "write_demo_data",
    "wrong_answer",
]
