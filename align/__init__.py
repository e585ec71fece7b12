"""align: post-train LLMs with preferences, in the multi-stage recipes of frontier reports.

The Python API mirrors the CLI: each ``align <command>`` is a typed config plus a function, both
importable from here under the names its module gives them (``run_sft`` and ``SFTConfig``,
``run_merge`` and ``MergeConfig``, ...; every registered command, plugins' included). Recipes:
``Recipe`` (load, plan, run, results), ``workdir_status`` and ``write_report``.

    from align import SFTConfig, run_sft
    record = run_sft(SFTConfig(model_name_or_path="runs/tiny", dataset="runs/demo/sft.jsonl",
                                    output_dir="runs/sft", max_steps=600, learning_rate=1e-3))
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The names that are not a command's (those come from ``align.stages.api``: read from the source).
_LAZY = {
    "make_tiny_model": "align.tasks.tiny",
    "write_demo_data": "align.tasks.demo",
    "load_dataset": "align.training.data",
    "load_rows": "align.training.data",
    "evaluate": "align.training.evaluation",
    "AlignError": "align.core.errors",
    "Recipe": "align.pipeline.recipe",
    "workdir_status": "align.pipeline.status",
    "write_report": "align.pipeline.status",
}


def _names() -> dict[str, str]:
    """{public name: module}: ``_LAZY`` and every command's run function and config class."""
    return {**importlib.import_module("align.stages").api(), **_LAZY}


def __getattr__(name: str):
    """Import heavy modules (torch, transformers) only when their names are used."""
    if name == "__all__":
        return ["__version__", *_names()]
    if name.startswith("__"):
        raise AttributeError(f"module 'align' has no attribute {name!r}")
    module = _LAZY.get(name) or _names().get(name)
    if module is None:
        raise AttributeError(f"module 'align' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_names()})
