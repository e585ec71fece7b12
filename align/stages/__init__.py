"""Stages: each is a typed config plus a run function, registered as an ``align`` command.

``MODULES`` names the modules whose import registers the commands that write a stage folder (the
kinds a recipe's stage may be), in the order ``align --help`` lists them; ``load()`` imports them.
Importing them imports torch and the training libraries, so only code that needs their configs
calls ``load()``: the recipe reader (``align.pipeline``) and the command line before it runs a command.
"""

from __future__ import annotations

import importlib

MODULES = (
    "align.commands",  # make-tiny-model, demo-data, situation-prompts, import-model
    "align.stages.sft",
    "align.stages.rs",
    "align.stages.eval",
    "align.stages.dpo",
    "align.stages.rm",
    "align.stages.rlhf",
    "align.stages.merge",
    "align.stages.distill",
    "align.stages.select",
)


def load() -> None:
    """Import every module in ``MODULES`` (a module already imported is not run again)."""
    for name in MODULES:
        importlib.import_module(name)
