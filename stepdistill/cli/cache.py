"""`stepdistill cache build --config RECIPE [key=value ...]`: the latent cache of a recipe's ``train_data``, before
training (which reuses it). Rank-aware: under ``torchrun`` / ``accelerate launch`` process ``RANK`` of
``WORLD_SIZE`` encodes the shards ``RANK::WORLD_SIZE``; ``--shard-index I --num-shards N`` does the same for job
arrays. A killed build continues where it stopped (a finished shard is skipped); the worker that finds every shard
done writes the manifest."""
from __future__ import annotations

import os

import torch

from ..data.cache import build_cache
from ..data.sources import iter_examples
from ..errors import ConfigError
from ..models.latents import native_resolution
from ..training.preflight import check_model_source, load_model
from .distill import build_config


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"{name}={os.environ[name]!r} is not an integer; unset it or fix the launcher") from None


def cmd_cache_build(args):
    config = build_config(args.config, args.overrides)
    index = args.shard_index if args.shard_index is not None else _env_int("RANK", 0)
    count = args.num_shards if args.num_shards is not None else _env_int("WORLD_SIZE", 1)
    if args.shard_size is not None and args.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {args.shard_size}; e.g. --shard-size 1024")
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard-index {index} / --num-shards {count}: need 0 <= index < count")
    local = _env_int("LOCAL_RANK", 0)
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    check_model_source(config.pretrained_model)
    pipe = load_model(config.pretrained_model, device=device, dtype=torch.float32)
    resolution = config.resolution or native_resolution(pipe)
    plan = build_cache(pipe, iter_examples(config.train_data, config.caption_column, config.image_column),
                       resolution, config.resolved_cache_dir, model_id=config.pretrained_model,
                       batch_size=args.batch_size, shard_size=args.shard_size, shard_index=index, num_shards=count)
    done = (config.resolved_cache_dir / "manifest.json").exists()
    print(f"worker {index} of {count}: encoded {len(plan.encoded)} shard(s) of {len(plan.shards)} "
          f"({plan.num_examples} examples) in {config.resolved_cache_dir}; "
          + ("the cache is complete" if done else "other workers' shards are still missing: run them (or rerun "
             "without --shard-index/--num-shards)"))


def add_cache_commands(subparsers):
    cache = subparsers.add_parser("cache", help="the latent cache of a recipe's training data")
    sub = cache.add_subparsers(dest="cache_command", required=True)
    b = sub.add_parser("build", help="encode train_data into cache_dir (rank-aware, resumable)")
    b.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml); cache_dir defaults to "
                                                  "<output_dir>/cache, where training looks for it")
    b.add_argument("--shard-index", type=int, default=None, help="this worker's index (default: $RANK or 0)")
    b.add_argument("--num-shards", type=int, default=None, help="how many workers (default: $WORLD_SIZE or 1)")
    b.add_argument("--shard-size", type=int, default=None,
                   help="examples per cache shard (default: that of the cache already there, else 1024; training "
                        "and later builds follow what the cache records)")
    b.add_argument("--batch-size", type=int, default=64, help="images per VAE batch (default 64)")
    b.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train_data=toy:2000")
    b.set_defaults(func=cmd_cache_build)
    return b
