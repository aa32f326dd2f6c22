"""``stepdistill export`` (convert a LoRA between layouts), ``stepdistill inspect`` (describe one) and
``stepdistill average`` (the weighted mean of several adapters' updates, as one LoRA). Malformed
or missing files and impossible conversions print ``error: <message>`` to stderr and exit with code 2."""
from __future__ import annotations

import json
import sys

import torch

from ..lora import (
    DIFFUSERS_LAYOUT_NOTE,
    FLOW_FAMILIES,
    FLOW_KEYS,
    FORMATS,
    LoraFormatError,
    average_adapters,
    export_lora,
    format_inspection,
    inspect_lora,
)

_DTYPES = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _fail(message: str) -> SystemExit:
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def cmd_export(args):
    try:
        path, adapter = export_lora(args.input, args.output, args.format, base=args.base, dtype=_DTYPES[args.dtype],
                                    title=args.title, flow_keys=args.flow_keys, allow_unmapped=args.allow_unmapped,
                                    family=args.family)
    except (LoraFormatError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    print(f"wrote {path}: {len(adapter.layers)} {adapter.component} layers, {adapter.format} -> {args.format}"
          + (f" ({args.flow_keys} keys)" if args.format == "comfy-flow" else ""))
    if args.format == "diffusers":
        print(DIFFUSERS_LAYOUT_NOTE)


def cmd_inspect(args):
    try:
        info = inspect_lora(args.file, base=args.base)
    except (LoraFormatError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    print(json.dumps(info, indent=1) if args.json else format_inspection(info))


def cmd_average(args):
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        raise _fail(f"--weights must be comma-separated numbers, one per adapter (e.g. 1,1,2), got {args.weights!r}") \
            from None
    try:
        path, errors = average_adapters(args.inputs, args.out, weights=weights, rank=args.rank, format=args.format,
                                        base=args.base, dtype=_DTYPES[args.dtype])
    except (LoraFormatError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    worst = max(errors.items(), key=lambda kv: kv[1])
    print(f"wrote {path}: the mean of {len(args.inputs)} adapters over {len(errors)} layers; "
          + ("exact at this rank" if worst[1] < 1e-6 else
             f"largest relative truncation error {worst[1]:.3g} ({worst[0]}): raise --rank to keep more"))


def add_lora_commands(subparsers):
    """Register ``export`` and ``inspect`` on an ``argparse`` subparsers object."""
    e = subparsers.add_parser("export", help="convert a LoRA between kohya, diffusers and ComfyUI flow layouts")
    e.add_argument("input", help="LoRA file (.safetensors) or a directory holding pytorch_lora_weights.safetensors")
    e.add_argument("output", help="output .safetensors file, or a directory (gets pytorch_lora_weights.safetensors)")
    e.add_argument("--format", required=True, choices=FORMATS,
                   help="kohya: lora_unet_* (UNet; diffusers/ComfyUI/A1111); diffusers: unet.*/transformer.* "
                        "lora_A/B; comfy-flow: transformer.* for SD3/FLUX in ComfyUI and diffusers")
    e.add_argument("--base", default=None, help="pipeline directory or 'toy': match names and shapes against it")
    e.add_argument("--dtype", default="keep", choices=sorted(_DTYPES), help="storage dtype (default: keep)")
    e.add_argument("--title", default=None, help="modelspec.title of the output")
    e.add_argument("--family", default=None, choices=sorted(FLOW_FAMILIES),
                   help="transformer LoRAs: the base family when neither metadata nor --base tells")
    e.add_argument("--flow-keys", default="transformer", choices=FLOW_KEYS,
                   help="comfy-flow key names: transformer.* (ComfyUI + diffusers) or lora_transformer_* "
                        "(onetrainer style; ComfyUI only)")
    e.add_argument("--allow-unmapped", action="store_true",
                   help="comfy-flow: write layers ComfyUI does not map instead of refusing")
    e.set_defaults(func=cmd_export)

    i = subparsers.add_parser("inspect", help="describe a LoRA file: format, base family, ranks, modules, metadata")
    i.add_argument("file")
    i.add_argument("--base", default=None, help="pipeline directory or 'toy' to check the LoRA against")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=cmd_inspect)

    a = subparsers.add_parser("average", help="average several adapters' weight updates into one LoRA (a model "
                                              "soup of runs from the same start)")
    a.add_argument("inputs", nargs="+", help="LoRA files or run directories, all of one method and base")
    a.add_argument("--out", required=True, help="output .safetensors file, or a directory")
    a.add_argument("--weights", default=None, help="comma-separated weights, one per input (default: equal)")
    a.add_argument("--rank", type=int, default=None, help="rank of the result (default: the inputs' largest); "
                                                         "below the mean update's rank the SVD truncates")
    a.add_argument("--format", default="kohya", choices=FORMATS, help="layout of the result (default: kohya)")
    a.add_argument("--base", default=None, help="pipeline directory or 'toy': match names and shapes against it")
    a.add_argument("--dtype", default="keep", choices=sorted(_DTYPES), help="storage dtype (default: the first "
                                                                           "input's)")
    a.set_defaults(func=cmd_average)
