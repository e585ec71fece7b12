"""Which process of a distributed launch this one is (accelerate, torchrun and DeepSpeed set ``RANK``).

In the lowest layer so that ``align.core.config`` (whose output-folder check probes only on the main
process) and ``align.core.stage_dir`` (whose ``Stage`` writes only on it) share it without importing each other.
"""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """False in the non-zero ranks of a distributed launch (accelerate, torchrun and DeepSpeed set RANK)."""
    return os.environ.get("RANK", "0") == "0"


__all__ = ["is_main_process"]
