"""`stepdistill sample`: sample a pipeline, optionally with stacked LoRAs, into an image grid. The sampler and
guidance default to what the adapters were trained for (read from their headers)."""
from __future__ import annotations

from ..models.pipeline import load_pipeline
from ..sampling import (apply_sampler, generate, image_grid, load_loras_into_pipeline, lora_metadata,
                        sampler_from_lora)
from ..toy.world import TOY_GUIDANCE
from .common import parse_lora_spec


def cmd_sample(args):
    pipe = load_pipeline(args.model, device=args.device)
    loras = [parse_lora_spec(s) for s in args.lora]
    sampler, windows = sampler_from_lora(lora_metadata(loras)) if loras else (None, None)
    if loras:
        load_loras_into_pipeline(pipe, loras, fuse=args.fuse)
    scheduler = args.scheduler or sampler or "ddim"
    guidance = args.guidance if args.guidance is not None else (1.0 if loras else TOY_GUIDANCE)
    apply_sampler(pipe, scheduler, args.steps, windows)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    images, sec = generate(pipe, prompts, steps=args.steps, guidance=guidance, seed=args.seed)
    grid = image_grid([images], scale=args.scale)
    grid.save(args.out)
    print(f"wrote {args.out}: {len(images)} images, {args.steps} steps ({scheduler}), guidance {guidance}, "
          f"{sec:.4f} s/image on {pipe.device}")


def add_sample_command(subparsers):
    s = subparsers.add_parser("sample", help="sample a pipeline (optionally with LoRAs) into an image grid")
    s.add_argument("--model", default="toy", help="'toy', a local pipeline directory or a hub id")
    s.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance", type=float, default=None, help="CFG scale (default: 5 for the toy teacher, 1 with an acceleration LoRA)")
    s.add_argument("--scheduler", default=None, help="ddim, lcm, tcd, perflow, euler, dpmpp, pndm, flow_euler (default: from the LoRA: lcm for LCD, perflow for reflow)")
    s.add_argument("--lora", action="append", default=[], help="PATH[:WEIGHT]; repeat to stack adapters")
    s.add_argument("--fuse", action="store_true", help="fuse the LoRAs into the weights (faster sampling)")
    s.add_argument("--num-images", type=int, default=4, help="images per prompt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=int, default=4, help="upscale factor of the grid tiles")
    s.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    s.add_argument("--out", default="grid.png")
    s.set_defaults(func=cmd_sample)
    return s
