"""The ``align`` command line: ``align <command> [--config FILE.yaml] [--key value ...]``.

A thin layer, as in TRL's CLI, on top of the stages: each command registers (typed config class,
run function) in ``align.core.registry.COMMANDS``; this module imports the modules that register them
(no stage imports this one) before it runs a command, and reads the overview (``align --help``)
from their source without importing them, so it starts without torch. The run functions are the same ones the Python API exposes. User
errors (``AlignError``) become one line on stderr and exit code 2; ``--debug`` shows the traceback.
A write that fails for want of space becomes one line naming the file, exit code 1 (``WriteError``).
SIGTERM/SIGUSR1 stop a command at its next safe point with exit code 3 (``align.core.preempt``).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from align import stages
from align.core import preempt
from align.core.config import help_text, parse_config
from align.core.errors import EXIT_INTERRUPTED, AlignError, Interrupted
from align.core.registry import COMMANDS


def _load_commands() -> None:
    """Import the modules that register commands (kept here so `import align` stays light)."""
    stages.load()


def declared_commands() -> list[tuple[str, str]]:
    """(name, summary) of every command, in the order ``_load_commands`` registers them, read from the
    ``@command(NAME, CONFIG, SUMMARY)`` decorators in the command modules' source (``align.stages.declared``).
    Importing a stage module imports torch and the training libraries (seconds); the overview needs only
    these two strings, so ``align --help`` reads them without importing any (tests/project/test_cli.py checks
    that they match the registry)."""
    return [(d.name, d.summary) for d in stages.declared()]


def overview() -> str:
    commands = declared_commands()
    width = max(len(name) for name, _ in commands)
    lines = [
        "usage: align <command> [--config FILE.yaml] [--key value ...] [--debug]",
        "",
        "Post-train LLMs with preferences. Commands:",
    ]
    lines += [f"  {name.ljust(width)}  {summary}" for name, summary in commands]
    lines += ["", "`align <command> --help` lists a command's options."]
    return "\n".join(lines)


# Library warnings a user can do nothing about, each matched by its text and the module that
# issues it: (category, message regex, module regex). Found by running every command with
# --debug (which shows all warnings); any other warning, a user scorer's included, is shown.
NOISY_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # vLLM 0.32's kernel dispatcher probes every torch.distributed attribute once at import.
    (FutureWarning, r"`torch\.distributed\.reduce_op` is deprecated", r"vllm\."),
)


def _quiet_libraries() -> None:
    """Silence library chatter (per-call progress bars, log dumps, ``NOISY_WARNINGS``) so a stage
    shows one rich bar and the warnings that concern the user."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    for name in ("bitsandbytes", "vllm", "datasets", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, message, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _write_error(err: Exception, config) -> AlignError | None:
    """A write that failed for want of space anywhere in the command, as one ``WriteError`` line naming
    the file (the newest one in the command's output_dir when the error does not say which)."""
    from align.core.stage_dir import write_error

    return write_error(err, Path(getattr(config, "output_dir", None) or "."))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not debug:
        _quiet_libraries()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return 0
    if argv[0] in ("-V", "--version"):
        from align import __version__

        print(f"align {__version__}")
        return 0
    _load_commands()
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        err = COMMANDS.unknown(name)
        print(f"align: error: {err}", file=sys.stderr)
        return err.exit_code
    cmd = COMMANDS[name]
    if "-h" in rest or "--help" in rest:
        print(help_text(name, cmd.config, cmd.summary))
        return 0
    preempt.install()
    config = None
    try:
        config = (cmd.parse or parse_config)(cmd.config, rest)
        code = cmd.run(config)
    except AlignError as err:
        if debug:
            traceback.print_exc()
        print(f"align {name}: {'interrupted' if isinstance(err, Interrupted) else 'error'}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"align {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        fault = _write_error(err, config)
        if fault is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"align {name}: error: {fault}", file=sys.stderr)
        return fault.exit_code
    if preempt.requested():  # the stop signal came too late to cut the command short: say so to the scheduler
        print(
            f"align {name}: interrupted: {preempt.received()} received; the command finished first, a rerun is a no-op",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) and not isinstance(code, bool) else 0
