"""`stepdistill distill`: train an acceleration LoRA from a YAML recipe with ``key=value`` overrides.
`stepdistill reflow train RECIPE --couplings DIR` is the same command with ``method: reflow``."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import ConfigError
from ..training.config import load_config, parse_override
from ..training.loop import train


def build_config(config_path: str | None, override_specs: list[str], resume: str | None = None, **fixed):
    """The recipe with the ``key=value`` overrides (then the ``fixed`` keys) applied."""
    overrides = dict(parse_override(o) for o in override_specs)
    overrides.update(fixed)
    if resume:
        overrides["resume_from_checkpoint"] = resume
    return load_config(config_path, **overrides)


def cmd_distill(args):
    fixed = {"couplings_dir": args.couplings} if args.couplings else {}
    out = train(build_config(args.config, args.overrides, args.resume, **fixed))
    print(f"LoRA written to {out / 'pytorch_lora_weights.safetensors'}")


def cmd_reflow_train(args):
    """`reflow train [RECIPE] [--couplings DIR] [key=value ...]`: `distill` with ``method: reflow``."""
    config_path, override_specs = args.config, list(args.overrides)
    if config_path and "=" in config_path and not Path(config_path).exists():  # only overrides were given
        config_path, override_specs = None, [config_path] + override_specs
    if dict(parse_override(o) for o in override_specs).get("method", "reflow") != "reflow":
        raise ConfigError("`reflow train` trains method=reflow; use `stepdistill distill` for other methods")
    if config_path:
        data = yaml.safe_load(Path(config_path).read_text()) or {}
        if isinstance(data, dict) and data.get("method", "reflow") != "reflow":
            raise ConfigError(f"{config_path} is a method={data['method']!r} recipe, not a reflow one")
    fixed = {"method": "reflow", **({"couplings_dir": args.couplings} if args.couplings else {})}
    config = build_config(config_path, override_specs, **fixed)
    if not config.couplings_dir:
        raise ConfigError("reflow needs couplings: pass --couplings DIR or couplings_dir=DIR (made by "
                          "`stepdistill reflow couple`)")
    out = train(config)
    print(f"wrote the reflow LoRA to {out}")


def add_distill_command(subparsers):
    t = subparsers.add_parser("distill", help="train an acceleration LoRA (LCD or reflow) from a YAML recipe")
    t.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml)")
    t.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    t.add_argument("--couplings", default=None, help="reflow: shorthand for couplings_dir=DIR")
    t.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. max_train_steps=500")
    t.set_defaults(func=cmd_distill)
    return t
