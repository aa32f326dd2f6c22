"""The ``stepdistill`` command line: every argparse definition lives in this package, one module per command
family; the commands call down into the library (training, methods, eval, experiments, lora).

One error path: a known error (:class:`stepdistill.errors.StepdistillError` -- config, data, model, LoRA,
checkpoint, a diverged run -- or a missing file) prints one line ``error: <problem>; <fix>`` to stderr and exits
with code 2, as argparse does for bad arguments. ``--debug`` (anywhere on the line) or ``STEPDISTILL_DEBUG=1``
shows the traceback instead. Anything else is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..errors import StepdistillError
from .cache import add_cache_commands
from .data import add_data_commands
from .distill import add_distill_command
from .eval import add_eval_command
from .lora import add_lora_commands
from .reflow import add_reflow_commands
from .sample import add_sample_command
from .smoke import shrink_args, smoke_enabled
from .toy import add_demo_command, add_stacking_commands

DEBUG_ENV = "STEPDISTILL_DEBUG"
EXIT_USAGE = 2  # known errors exit like argparse's usage errors
KNOWN_ERRORS = (StepdistillError, FileNotFoundError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepdistill", description="Step distillation of diffusion models into few-step LoRAs")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error (also {DEBUG_ENV}=1); allowed anywhere on the line")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sample_command(sub)
    add_distill_command(sub)
    add_reflow_commands(sub)
    add_cache_commands(sub)
    add_data_commands(sub)
    add_eval_command(sub)
    add_lora_commands(sub)
    add_stacking_commands(sub)
    add_demo_command(sub)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may also come after options."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow an option (`reflow train CFG --couplings DIR max_train_steps=10`), which
    # argparse alone does not take for a second positional list: collect them; anything else is an error
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def error_line(e: BaseException) -> str:
    """``error: <message>`` on one line."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        message = f"{e.strerror}: {e.filename}; check the path"
    else:
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return f"error: {message}"


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def main(argv=None) -> int:
    """Run a command; returns the exit code (0, or 2 for a known error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    args = parse_args([a for a in argv if a != "--debug"])
    if smoke_enabled():  # STEPDISTILL_SMOKE=1: the same command, toy-sized (the executable-docs test)
        shrink_args(args)
    if debug:
        args.func(args)
        return 0
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        args.func(args)
    except KNOWN_ERRORS as e:
        print(error_line(e), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; `distill --resume latest` continues a training run from its last checkpoint",
              file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
    return 0


if __name__ == "__main__":
    sys.exit(main())
