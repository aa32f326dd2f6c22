"""``stepdistill`` command line: sample, demo (and the distillation commands)."""
from __future__ import annotations

import argparse
import sys


def _parse_lora(spec: str) -> tuple[str, float]:
    """``path[:weight]`` -> (path, weight)."""
    path, sep, weight = spec.rpartition(":")
    if sep and weight.replace(".", "", 1).replace("-", "", 1).isdigit():
        return path, float(weight)
    return spec, 1.0


def cmd_sample(args):
    from .sampling import generate, image_grid, load_pipeline, set_scheduler
    from .toy.world import TOY_GUIDANCE

    pipe = load_pipeline(args.model, device=args.device)
    guidance = args.guidance
    scheduler = args.scheduler
    loras = [_parse_lora(s) for s in args.lora]
    if loras:
        from .sampling import load_loras_into_pipeline

        methods = load_loras_into_pipeline(pipe, loras, fuse=args.fuse)
        if scheduler is None and "lcd" in methods:
            scheduler = "lcm"
        elif scheduler is None and "reflow" in methods:
            scheduler = "perflow"
        if guidance is None and methods:
            guidance = 1.0
    scheduler = scheduler or "ddim"
    guidance = TOY_GUIDANCE if guidance is None else guidance
    if scheduler == "perflow":  # the straightened student's sampler, windows from the reflow LoRA's header
        from .evaluate import apply_sampler
        from .lora_io import _resolve_file, read_lora

        windows = [read_lora(_resolve_file(path))[1].get("stepdistill.num_windows") for path, _ in loras]
        windows = [int(w) for w in windows if w]
        apply_sampler(pipe, "perflow", args.steps, windows[0] if windows else None)
    else:
        set_scheduler(pipe, scheduler, **({"trailing": args.steps < 25} if scheduler == "ddim" else {}))
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    images, sec = generate(pipe, prompts, steps=args.steps, guidance=guidance, seed=args.seed)
    grid = image_grid([images], scale=args.scale)
    grid.save(args.out)
    print(f"wrote {args.out}: {len(images)} images, {args.steps} steps ({scheduler}), guidance {guidance}, "
          f"{sec:.4f} s/image on {pipe.device}")


def cmd_demo(args):
    from .demo import run_demo

    run_demo(args.out, n_prompts=args.num_prompts, device=args.device, seed=args.seed, method=args.method)


def cmd_distill(args):
    from .config import load_config, parse_override
    from .training import train

    overrides = dict(parse_override(o) for o in args.overrides)
    if args.resume:
        overrides["resume_from_checkpoint"] = args.resume
    config = load_config(args.config, **overrides)
    out = train(config)
    print(f"LoRA written to {out / 'pytorch_lora_weights.safetensors'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepdistill", description="Step distillation of diffusion models into few-step LoRAs")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample a pipeline (optionally with LoRAs) into an image grid")
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

    t = sub.add_parser("distill", help="train an acceleration LoRA (LCD or reflow) from a YAML recipe")
    t.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml)")
    t.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    t.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. max_train_steps=500")
    t.set_defaults(func=cmd_distill)

    from .couplings import add_reflow_commands
    from .evaluate import add_eval_command
    from .export import add_portability_commands

    add_reflow_commands(sub)
    add_eval_command(sub)
    add_portability_commands(sub)

    d = sub.add_parser("demo", help="the main job on the embedded toy world")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--num-prompts", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--method", default="lcd", choices=["teacher", "lcd", "reflow", "all"])
    d.add_argument("--device", default=None)
    d.set_defaults(func=cmd_demo)
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
