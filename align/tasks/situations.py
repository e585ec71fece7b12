"""Writing prompts about everyday situations, for preference tasks judged on tone.

A prompt asks for a sentence or two about a situation ("Describe a delayed flight in one
sentence."): the situations are ordinary, often mildly annoying, so a chat model's answers vary
in tone from gloomy to cheerful and a sentiment judge (``rule:vader``) separates them. This is
the prompt side of the synthetic-gold protocol (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization"), in the spirit of Ziegler et al. 2019's positive-continuation task, with
prompts the project generates instead of a downloaded corpus.

``write_situation_prompts`` writes ``prompts.jsonl`` (training prompts) and ``test.jsonl``
(held-out prompts), TRL prompt-only rows with a ``prompt_id`` and the ``situation`` they ask about. The held-out prompts are about
situations no training prompt mentions, so a gain on them is a change of tone, not a memorised
answer.
"""

from __future__ import annotations

import pathlib
import random

from align.core.errors import ConfigError
from align.tasks.demo import _write_jsonl

TEMPLATES = (
    "Write one sentence about {t}.",
    "Describe {t} in one sentence.",
    "In one or two sentences, tell me about {t}.",
    "Write a short note about {t}.",
    "What do you think about {t}? Answer in one sentence.",
    "Tell a friend about {t} in one sentence.",
    "Write a one-sentence diary entry about {t}.",
    "Sum up {t} in a sentence.",
)

SITUATIONS = (
    "a rainy Monday morning",
    "the morning commute",
    "a long queue at the bank",
    "the office printer",
    "a power outage",
    "moving to a new city",
    "a job interview",
    "the first snow of the year",
    "an old bicycle",
    "a crowded train",
    "waiting for a bus",
    "a broken umbrella",
    "the neighbour's dog",
    "a hospital waiting room",
    "homework",
    "tax season",
    "a delayed flight",
    "cold coffee",
    "a dentist appointment",
    "the last day of school",
    "a traffic jam",
    "burnt toast",
    "an empty fridge",
    "a group project",
    "a noisy neighbour",
    "a lost key",
    "a flat tyre",
    "a long meeting",
    "cleaning the kitchen",
    "a hot summer afternoon",
    "a missed phone call",
    "a software update",
    "a cancelled concert",
    "the first day at a new school",
    "a parking ticket",
    "a slow internet connection",
    "doing the laundry",
    "a snowstorm",
    "a family dinner",
    "a job rejection",
    "an unexpected bill",
    "a long drive at night",
    "a hotel room",
    "a night shift",
    "learning to drive",
    "an exam week",
    "a wedding rehearsal",
    "a leaking tap",
    "a power cut during dinner",
    "a visit to the post office",
    "a sore throat",
    "a surprise party",
    "a messy desk",
    "a crowded supermarket",
    "a foggy morning",
    "a broken phone screen",
    "an overdue library book",
    "a new haircut",
    "a museum on a Sunday",
    "waiting for test results",
    "a rainy holiday",
    "a lost wallet",
    "a boring lecture",
    "a camping trip",
    "an alarm that did not ring",
    "the end of a vacation",
    "a busy airport",
    "a noisy construction site",
    "an old photograph",
    "a late train",
    "a windy beach",
    "a neighbour's party",
    "a grocery list",
    "a small apartment",
    "a city bus",
    "a cold shower",
    "a power bill",
    "a quiet Sunday",
    "a job deadline",
    "a queue at the pharmacy",
    "a school reunion",
    "a traffic light that never changes",
    "a spilled cup of tea",
    "a slow waiter",
    "a long phone call with customer service",
    "a broken elevator",
    "a garden after the storm",
    "the first day of autumn",
    "a forgotten birthday",
    "a crowded bus stop",
    "a new neighbour",
    "an empty office",
    "a closed shop",
    "a train station at night",
    "a mountain hike in the rain",
    "a hospital visit",
    "a hot crowded room",
    "a morning run",
    "a cracked window",
    "a dinner that went cold",
    "a long weekend",
    "a rainy football match",
    "the first week at a new job",
    "a lost suitcase",
    "a noisy café",
    "an overcooked pasta",
    "a dead phone battery",
    "a late pizza delivery",
    "a blocked road",
    "a cold office",
    "an old car",
    "a dull afternoon",
    "a crowded beach",
    "a paper due tomorrow",
    "a noisy fan",
    "a moving day",
    "a rainy walk home",
    "a hard exam",
    "a quiet library",
    "a lost glove",
    "the last bus home",
    "a long flight",
    "a tax form",
    "a cold winter night",
    "a missed deadline",
    "a stuck zipper",
    "a rainy picnic",
    "a job that pays little",
    "an old sofa",
    "a broken heater",
    "a dark morning",
    "a waiting room with no chairs",
    "a meeting that could have been an email",
    "a bike with a flat tyre",
    "a neighbour's loud music",
    "a delayed package",
    "a small garden",
    "a rainy wedding",
    "a long queue for coffee",
    "an unfinished book",
    "a lost pen",
    "a cold cup of soup",
    "a slow computer",
    "a group chat",
    "a crowded lift",
    "a first date",
    "a dull meeting",
    "an empty street",
    "a sleepless night",
    "a kitchen full of dishes",
    "a train that was cancelled",
    "a week of rain",
    "a village in winter",
    "a Monday meeting",
    "a busy road",
)

HELD_OUT_SITUATIONS = 25  # situations whose prompts form test.jsonl (25 x 8 templates = 200 prompts)


def situation_prompts() -> list[tuple[str, str]]:
    """Every (situation, prompt text) pair, in a fixed order."""
    return [(s, template.format(t=s)) for s in SITUATIONS for template in TEMPLATES]


def _row(i: int, situation: str, text: str) -> dict:
    return {"prompt": [{"role": "user", "content": text}], "prompt_id": f"situation-{i}", "situation": situation}


def write_situation_prompts(output_dir, seed: int = 0, held_out: int = HELD_OUT_SITUATIONS) -> dict[str, pathlib.Path]:
    """Write ``prompts.jsonl`` and ``test.jsonl`` (situations split by ``seed``); returns the paths.

    The same arguments give byte-identical files; training prompts are shuffled, held-out ones
    keep the fixed order."""
    situations = sorted(set(SITUATIONS))
    if not isinstance(held_out, int) or not 0 < held_out < len(situations):
        raise ConfigError(
            f"held_out must be an integer in 1..{len(situations) - 1} (situations to hold out), got {held_out!r}"
        )
    random.Random(f"{seed}:situations").shuffle(situations)
    test_set = set(situations[:held_out])
    numbered = list(enumerate(situation_prompts()))
    train = [(i, s, text) for i, (s, text) in numbered if s not in test_set]
    random.Random(f"{seed}:prompts").shuffle(train)
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"prompts": out / "prompts.jsonl", "test": out / "test.jsonl"}
    _write_jsonl(paths["prompts"], (_row(*item) for item in train))
    _write_jsonl(paths["test"], (_row(i, s, text) for i, (s, text) in numbered if s in test_set))
    return paths


__all__ = ["SITUATIONS", "TEMPLATES", "situation_prompts", "write_situation_prompts"]
