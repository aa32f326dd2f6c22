"""The ``stepdistill`` command line: every argparse definition lives in this package, one module per command
family; the commands call down into the library (training, methods, eval, experiments, lora)."""
from __future__ import annotations

import argparse
import sys

from .distill import add_distill_command
from .eval import add_eval_command
from .lora import add_lora_commands
from .reflow import add_reflow_commands
from .sample import add_sample_command
from .toy import add_demo_command, add_stacking_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepdistill", description="Step distillation of diffusion models into few-step LoRAs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sample_command(sub)
    add_distill_command(sub)
    add_reflow_commands(sub)
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


def main(argv=None):
    args = parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
