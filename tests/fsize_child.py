"""Run the align CLI in a process whose disk fills up mid-run: ``python tests/fsize_child.py TRIGGER
LIMIT align-args...``. Once the file TRIGGER exists, the process's file-size limit
(``RLIMIT_FSIZE``) drops to LIMIT bytes, so every later write past that size fails with EFBIG as
on a full disk (SIGXFSZ ignored, as a process that handles a full disk has it). No privileges needed.
"""

from __future__ import annotations

import resource
import signal
import sys
import threading
import time
from pathlib import Path


def limit_when(trigger: Path, limit: int) -> None:
    while not trigger.exists():
        time.sleep(0.005)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


if __name__ == "__main__":
    trigger, limit, *argv = sys.argv[1:]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    threading.Thread(target=limit_when, args=(Path(trigger), int(limit)), daemon=True).start()
    from align.cli import main

    sys.exit(main(argv))
