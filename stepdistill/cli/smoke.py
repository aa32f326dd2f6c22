"""``STEPDISTILL_SMOKE=1``: run any documented command toy-sized, the same command line otherwise.

The executable-docs test (``tests/test_docs.py``) runs every shell command of README.md and docs/*.md with this
variable set, so a recipe that trains 400 steps on 4000 toy scenes trains 4 steps on 32, `reflow couple --prompts
toy:2048:1` makes 16 couplings, and the demo evaluates 4 prompts. Only sizes change: every flag, path, recipe,
sampler and model of the command is the documented one, so a renamed flag, a broken recipe or a missing output
still fails. Figures from a smoke run mean nothing; the command says so on stderr.

What shrinks: ``toy:N[:...]`` prompt and data specs (arguments, ``key=value`` overrides and the recipe's
``train_data``) to at most :data:`TOY_ITEMS`; training steps (``max_train_steps``, ``--finetune-steps``,
`train-style --steps`) to :data:`TRAIN_STEPS`; ``--num-prompts`` to :data:`PROMPTS`; `train-style
--n-images`, `transfer-eval --finetune-images` and `stack-eval --n-reference` to :data:`TOY_ITEMS`; weight sweeps (`stack-eval --accel-weights / --style-weights`) to two
weights (the first, and 1 where the sweep has it). Sampling steps and guidance are never changed.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import yaml

from ..training.config import load_yaml

SMOKE_ENV = "STEPDISTILL_SMOKE"
TOY_ITEMS = 32
TRAIN_STEPS = 4
PROMPTS = 4
DEFAULT_TRAIN_DATA = "toy:4000"  # TrainConfig.train_data's default
_TOY_SPEC = re.compile(r"^toy:(\d+)(:.*)?$")
_TRAINING_COMMANDS = {"train-style"}  # commands whose --steps are training steps, not sampling steps


def smoke_enabled() -> bool:
    return os.environ.get(SMOKE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def shrink_toy_spec(value):
    """``toy:2048:1`` -> ``toy:32:1``; anything else unchanged."""
    m = _TOY_SPEC.match(value) if isinstance(value, str) else None
    if not m or int(m.group(1)) <= TOY_ITEMS:
        return value
    return f"toy:{TOY_ITEMS}{m.group(2) or ''}"


def shrink_weight_sweep(value: str) -> str:
    """``0.5,0.75,1.0,1.25`` -> ``0.5,1.0``: the first weight and 1 (or the last, where 1 is not swept)."""
    weights = [w.strip() for w in value.split(",") if w.strip()]
    if len(weights) <= 2:
        return value
    one = next((w for w in weights if _is_one(w)), weights[-1])
    return ",".join([weights[0], one] if one != weights[0] else weights[:2])


def _is_one(text: str) -> bool:
    try:
        return float(text) == 1.0
    except ValueError:
        return False


def _recipe_train_data(config_path: str | None, overrides: list[str]) -> str | None:
    for spec in reversed(overrides):
        key, _, value = spec.partition("=")
        if key.strip() == "train_data":
            return value.strip()
    if config_path and Path(config_path).is_file():
        try:
            data = load_yaml(Path(config_path).read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            return None  # the command itself reports a broken recipe
        if isinstance(data, dict):
            return str(data.get("train_data", DEFAULT_TRAIN_DATA))
    return DEFAULT_TRAIN_DATA


def training_overrides(train_data: str | None = DEFAULT_TRAIN_DATA) -> dict:
    """The recipe overrides of a smoke run: few steps, few toy scenes (only where the data is the toy world)."""
    out = {"max_train_steps": TRAIN_STEPS}
    small = shrink_toy_spec(train_data)
    if small != train_data:
        out["train_data"] = small
    return out


def shrink_args(args) -> list[str]:
    """Shrink a parsed command line in place; returns what changed (``name: old -> new``)."""
    changed = []

    def cap(name, value):
        old = getattr(args, name)
        if old != value:
            setattr(args, name, value)
            changed.append(f"{name}: {old} -> {value}")

    for name, value in list(vars(args).items()):
        if isinstance(value, str):
            cap(name, shrink_toy_spec(value))
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value) and name != "overrides":
            cap(name, [shrink_toy_spec(v) for v in value])
    for name in ("accel_weights", "style_weights"):
        if isinstance(getattr(args, name, None), str):
            cap(name, shrink_weight_sweep(getattr(args, name)))
    for name, limit in (("num_prompts", PROMPTS), ("n_images", TOY_ITEMS), ("finetune_steps", TRAIN_STEPS),
                        ("finetune_images", TOY_ITEMS), ("n_reference", TOY_ITEMS)):
        if isinstance(getattr(args, name, None), int):
            cap(name, min(getattr(args, name), limit))
    if getattr(args, "command", None) in _TRAINING_COMMANDS and isinstance(getattr(args, "steps", None), int):
        cap("steps", min(args.steps, TRAIN_STEPS))
    if isinstance(getattr(args, "overrides", None), list):  # distill / reflow train: recipe + key=value overrides
        config = getattr(args, "config", None)
        overrides = [o if "=" not in o else o.split("=", 1)[0] + "=" + shrink_toy_spec(o.split("=", 1)[1])
                     for o in args.overrides]
        extra = training_overrides(_recipe_train_data(config if config and "=" not in config else None, overrides))
        given = dict(o.split("=", 1) for o in overrides if "=" in o)
        if given.get("max_train_steps", "").strip().isdigit() and int(given["max_train_steps"]) <= TRAIN_STEPS:
            extra.pop("max_train_steps")  # already toy-sized: never lengthen a run
        cap("overrides", overrides + [f"{k}={v}" for k, v in extra.items()])
    if changed:
        print(f"{SMOKE_ENV}=1: toy-sized run, figures are not meaningful ({'; '.join(changed)})", file=sys.stderr)
    return changed
