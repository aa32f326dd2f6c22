"""`stepdistill data webdataset SOURCE --out DIR`: any training-data source (``toy:N``, an image folder, an
imagefolder with metadata.jsonl, a ``save_to_disk`` dataset) written as WebDataset shards, the input of
``data_mode: streaming``. Shards are written whole (temporary name, then renamed)."""
from __future__ import annotations

from ..data.sources import iter_examples
from ..data.streaming import write_webdataset
from ..errors import ConfigError


def cmd_data_webdataset(args):
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {args.shard_size}; e.g. --shard-size 1000")
    paths = write_webdataset(iter_examples(args.source, args.caption_column, args.image_column), args.out,
                             shard_size=args.shard_size, image_format=args.image_format)
    last = len(paths) - 1
    pattern = f"{args.out.rstrip('/')}/{{00000..{last:05d}}}.tar"
    print(f"wrote {len(paths)} shard(s) to {args.out}; train on them with "
          f"data_mode=streaming train_data='{pattern}'")


def add_data_commands(subparsers):
    data = subparsers.add_parser("data", help="convert training data")
    sub = data.add_subparsers(dest="data_command", required=True)
    w = sub.add_parser("webdataset", help="write a training-data source as WebDataset shards")
    w.add_argument("source", help="toy:N, an image folder, an imagefolder (metadata.jsonl) or a save_to_disk dataset")
    w.add_argument("--out", required=True, help="directory for the shards 00000.tar, 00001.tar, ...")
    w.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    w.add_argument("--image-format", default="png", choices=["png", "jpg"])
    w.add_argument("--caption-column", default="text")
    w.add_argument("--image-column", default="image")
    w.set_defaults(func=cmd_data_webdataset)
    return w
