"""`stepdistill distill`: train an acceleration LoRA from a YAML recipe with ``key=value`` overrides.
`stepdistill reflow train RECIPE --couplings DIR` is the same command with ``method: reflow``."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import ConfigError
from ..training.config import load_config, load_yaml, parse_override
from ..training.loop import train


def build_config(config_path: str | None, override_specs: list[str], resume: str | None = None,
                 overwrite: bool = False, **fixed):
    """The recipe with the ``key=value`` overrides (then the ``fixed`` keys) applied."""
    overrides = dict(parse_override(o) for o in override_specs)
    overrides.update(fixed)
    if resume:
        overrides["resume_from_checkpoint"] = resume
    if overwrite:
        overrides["overwrite"] = True
    config = load_config(config_path, **overrides)
    if config.overwrite and config.resume_from_checkpoint:
        raise ConfigError("--overwrite starts the run again and --resume continues it; pass one of them")
    return config


def cmd_distill(args):
    fixed = {"couplings_dir": args.couplings} if args.couplings else {}
    out = train(build_config(args.config, args.overrides, args.resume, args.overwrite, **fixed))
    print(f"LoRA written to {out / 'pytorch_lora_weights.safetensors'}")


def cmd_reflow_train(args):
    """`reflow train [RECIPE] [--couplings DIR] [key=value ...]`: `distill` with ``method: reflow``."""
    config_path, override_specs = args.config, list(args.overrides)
    if config_path and "=" in config_path and not Path(config_path).exists():  # only overrides were given
        config_path, override_specs = None, [config_path] + override_specs
    if dict(parse_override(o) for o in override_specs).get("method", "reflow") != "reflow":
        raise ConfigError("`reflow train` trains method=reflow; use `stepdistill distill` for other methods")
    if config_path and Path(config_path).is_file():
        try:
            data = load_yaml(Path(config_path).read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            data = {}  # load_config reports it, with the line
        if isinstance(data, dict) and data.get("method", "reflow") != "reflow":
            raise ConfigError(f"{config_path} is a method={data['method']!r} recipe, not a reflow one")
    fixed = {"method": "reflow", **({"couplings_dir": args.couplings} if args.couplings else {})}
    config = build_config(config_path, override_specs, getattr(args, "resume", None), getattr(args, "overwrite", False),
                          **fixed)
    if not config.couplings_dir:
        raise ConfigError("reflow needs couplings: pass --couplings DIR or couplings_dir=DIR (made by "
                          "`stepdistill reflow couple`)")
    out = train(config)
    print(f"wrote the reflow LoRA to {out}")


def add_distill_command(subparsers):
    t = subparsers.add_parser("distill", help="train an acceleration LoRA (LCD or reflow) from a YAML recipe")
    t.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml)")
    t.add_argument("--resume", default=None,
                   help="'latest' or a checkpoint directory: continue that run (a damaged newest checkpoint is "
                        "skipped for the previous one; no checkpoint is an error)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in output_dir (its checkpoints and adapter are deleted; the latent "
                        "cache stays). Without it a fresh run refuses a used output_dir")
    t.add_argument("--couplings", default=None, help="reflow: shorthand for couplings_dir=DIR")
    t.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. max_train_steps=500")
    t.set_defaults(func=cmd_distill)
    return t
