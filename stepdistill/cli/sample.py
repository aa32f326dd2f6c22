"""`stepdistill sample`: sample a pipeline, optionally with stacked LoRAs, into an image grid. The sampler and
guidance default to what the adapters were trained for (read from their headers)."""
from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_write_json
from ..errors import ConfigError
from ..sampling import (
    SCHEDULERS,
    apply_sampler,
    check_sampling_args,
    generate,
    image_grid,
    load_loras_into_pipeline,
    lora_metadata,
    sampler_from_lora,
)
from ..toy.world import TOY_GUIDANCE, evaluation_prompts
from ..training.preflight import load_model
from .common import check_at_least, parse_lora_spec

SAMPLERS = (*SCHEDULERS, "perflow")
DEFAULT_TOY_PROMPTS = 4


def cmd_sample(args):
    check_sampling_args(args.steps, 1.0 if args.guidance is None else args.guidance, "--steps", "--guidance")
    check_at_least(num_images=(args.num_images, 1), scale=(args.scale, 1))
    if args.scheduler is not None and args.scheduler not in SAMPLERS:
        raise ConfigError(f"--scheduler {args.scheduler!r} is not a sampler; choose one of {', '.join(SAMPLERS)}")
    prompt_list = args.prompt or default_prompts(args.model)  # before the model loads: a missing --prompt fails fast
    loras = [parse_lora_spec(s) for s in args.lora]
    metadatas = lora_metadata(loras)  # a missing or unreadable LoRA file fails before the model loads
    pipe = load_model(args.model, key="--model", device=args.device)
    sampler, windows = sampler_from_lora(metadatas) if loras else (None, None)
    if loras:
        load_loras_into_pipeline(pipe, loras, fuse=args.fuse)
    scheduler = args.scheduler or sampler or "ddim"
    guidance = args.guidance if args.guidance is not None else (1.0 if loras else TOY_GUIDANCE)
    apply_sampler(pipe, scheduler, args.steps, windows)
    prompts = [p for p in prompt_list for _ in range(args.num_images)]
    images, sec = generate(pipe, prompts, steps=args.steps, guidance=guidance, seed=args.seed)
    rows = [images[i * args.num_images:(i + 1) * args.num_images] for i in range(len(prompt_list))]
    grid = image_grid(rows, row_labels=list(prompt_list), scale=args.scale)  # one row per prompt, labelled
    grid.save(args.out)
    record = {"prompts": list(prompt_list), "images_per_prompt": args.num_images, "steps": args.steps,
              "sampler": scheduler, "guidance": guidance, "seed": args.seed, "loras": [[p, w] for p, w in loras]}
    atomic_write_json(Path(args.out).with_suffix(".json"), record)
    cfg = "" if guidance > 1 else " (no classifier-free guidance)"
    print(f"wrote {args.out}: {len(images)} images, {args.steps} steps ({scheduler}), guidance {guidance}{cfg}, "
          f"{sec:.4f} s/image on {pipe.device}; prompts in {Path(args.out).with_suffix('.json').name}")


def default_prompts(model: str) -> list[str]:
    """Without ``--prompt``: four fixed prompts of the toy world (its evaluation prompts); other models need one."""
    if model != "toy":
        raise ConfigError("no --prompt given; pass --prompt TEXT (repeatable) for this model")
    return evaluation_prompts(DEFAULT_TOY_PROMPTS)


def add_sample_command(subparsers):
    s = subparsers.add_parser("sample", help="sample a pipeline (optionally with LoRAs) into an image grid")
    s.add_argument("--model", default="toy", help="'toy', a local pipeline directory or a hub id")
    s.add_argument("--prompt", action="append", default=[],
                   help="repeat for several prompts (default for --model toy: 4 fixed toy prompts)")
    s.add_argument("--steps", type=int, default=50, help="sampling steps, >= 1")
    s.add_argument("--guidance", type=float, default=None,
                   help="CFG scale, >= 0; values <= 1 sample without classifier-free guidance "
                        f"(default: {TOY_GUIDANCE:g} for the toy teacher, 1 with an acceleration LoRA)")
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
