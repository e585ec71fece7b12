"""align: post-train LLMs with preferences, in the multi-stage recipes of frontier reports.

The Python API mirrors the CLI: each ``align <command>`` is a typed config plus a function.

    from align import SFTStageConfig, run_sft
    record = run_sft(SFTStageConfig(model_name_or_path="runs/tiny", dataset="runs/demo/sft.jsonl",
                                    output_dir="runs/sft", max_steps=600, learning_rate=1e-3))
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "make_tiny_model": "align.tiny",
    "write_demo_data": "align.demo",
    "load_dataset": "align.data",
    "load_rows": "align.data",
    "SFTStageConfig": "align.stages.sft",
    "run_sft": "align.stages.sft",
    "RSConfig": "align.stages.rs",
    "run_rs": "align.stages.rs",
    "RMStageConfig": "align.stages.rm",
    "run_rm": "align.stages.rm",
    "EvalConfig": "align.stages.eval",
    "run_eval": "align.stages.eval",
    "DPOStageConfig": "align.stages.dpo",
    "run_dpo": "align.stages.dpo",
    "RLHFConfig": "align.stages.rlhf",
    "run_rlhf": "align.stages.rlhf",
    "SelectConfig": "align.stages.select",
    "run_select": "align.stages.select",
    "evaluate": "align.evaluation",
    "AlignError": "align.errors",
}


def __getattr__(name: str):
    """Import heavy modules (torch, transformers) only when their names are used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'align' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
