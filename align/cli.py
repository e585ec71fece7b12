"""The ``align`` command line: ``align <command> [--config FILE.yaml] [--key value ...]``.

A thin layer, as in TRL's CLI: each command maps to (typed config class, run function) in
``COMMANDS``; the run functions are the same ones the Python API exposes. User errors
(``AlignError``) become one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import traceback
from typing import Any, Callable

from align.config import BaseConfig, help_text, parse_config
from align.errors import AlignError


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    config: type[BaseConfig]
    run: Callable[[Any], Any]
    summary: str


COMMANDS: dict[str, Command] = {}


def command(name: str, config: type[BaseConfig], summary: str) -> Callable:
    """Register ``fn(config)`` as ``align <name>``. Duplicate names are a bug."""

    def register(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        if name in COMMANDS:
            raise ValueError(f"command {name!r} registered twice")
        COMMANDS[name] = Command(name, config, fn, summary)
        return fn

    return register


def _load_commands() -> None:
    """Import the modules that register commands (kept here so `import align` stays light)."""
    import align.commands  # noqa: F401  make-tiny-model, demo-data
    import align.stages.sft  # noqa: F401
    import align.stages.rs  # noqa: F401
    import align.stages.eval  # noqa: F401
    import align.stages.dpo  # noqa: F401
    import align.stages.rm  # noqa: F401
    import align.stages.rlhf  # noqa: F401
    import align.stages.merge  # noqa: F401


def overview() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: align <command> [--config FILE.yaml] [--key value ...] [--debug]",
        "",
        "Post-train LLMs with preferences. Commands:",
    ]
    lines += [f"  {name.ljust(width)}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "`align <command> --help` lists a command's options."]
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """Silence library chatter (per-call progress bars, log dumps) so a stage shows one rich bar."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    for name in ("bitsandbytes", "vllm", "datasets", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not debug:
        _quiet_libraries()
    _load_commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return 0
    if argv[0] in ("-V", "--version"):
        from align import __version__

        print(f"align {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"align: error: unknown command '{name}'{hint} (valid: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    if "-h" in rest or "--help" in rest:
        print(help_text(name, cmd.config, cmd.summary))
        return 0
    try:
        config = parse_config(cmd.config, rest)
        cmd.run(config)
    except AlignError as err:
        if debug:
            traceback.print_exc()
        print(f"align {name}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"align {name}: interrupted", file=sys.stderr)
        return 130
    return 0
