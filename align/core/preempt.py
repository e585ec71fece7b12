"""Preemption: SIGTERM or SIGUSR1 asks the running stage to stop at its next safe point.

Batch schedulers warn before they kill: Slurm sends SIGTERM about 30 s before SIGKILL at the time
limit (``--signal=B:USR1@120`` sends SIGUSR1 earlier), systemd and ``kill`` send SIGTERM. The
handlers only set a flag; each long stage checks it where stopping loses nothing:

* sft, rm, dpo (transformers' Trainer): at the next optimizer step end the Trainer writes a
  checkpoint and stops (``align.training.tracking.StageCallback``); the stage then raises ``Interrupted``
  instead of saving a final model.
* rlhf: at the end of the current iteration, after its checkpoint is written.
* rs: after the current shard of prompts is written to DIR/shards/.
* anything else (eval, or a stage that finished before it reached a safe point): the command
  completes, then exits with the interrupted code too, so a wrapper stops the pipeline there.

The CLI exits with ``EXIT_INTERRUPTED`` (3) and one line on stderr; rerunning the same command
(with ``--resume`` for the trainer stages and rlhf) continues from the checkpoint. Ctrl-C
(SIGINT) is left alone: it interrupts at once, as Python's default does.
"""

from __future__ import annotations

import signal
import sys
import threading

from align.core.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: str | None = None


def _handler(signum: int, frame) -> None:
    global _received
    _received = signal.Signals(signum).name


def install() -> bool:
    """Make SIGTERM and SIGUSR1 set the stop flag instead of killing the process.

    Python allows handlers only in the main thread; elsewhere this does nothing and returns False.
    Called by ``align.cli.main`` for every command; Python API users call it themselves.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    return True


def requested() -> bool:
    """True once a stop signal has arrived in this process."""
    return _received is not None


def received() -> str | None:
    """The name of the stop signal received ('SIGTERM', 'SIGUSR1'), or None."""
    return _received


def reset() -> None:
    """Forget a received signal (a notebook continuing after an interrupted stage)."""
    global _received
    _received = None


def agreed() -> bool:
    """``requested()`` in any process of a distributed launch (every rank calls it at the same
    point, so all stop at the same step); ``requested()`` in a single process."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return requested()
    import torch

    flag = torch.tensor([1.0 if requested() else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def stopped(what: str, kept: str, rerun: str = "rerun the same command with --resume") -> Interrupted:
    """The ``Interrupted`` error a stage raises at its safe point: which signal, where, what was kept."""
    return Interrupted(f"stopped by {_received or 'a signal'} {what}; {kept}; {rerun} to continue")
