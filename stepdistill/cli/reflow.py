"""`stepdistill reflow couple | train | solver-error`: teacher couplings, reflow training (an alias of
`stepdistill distill` with ``method: reflow``), and the coupling-solver error table."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ..data.couplings import STORAGE_DTYPES
from ..data.prompts import read_prompts
from ..errors import CouplingError
from ..methods.reflow_couplings import (
    coupling_solver_error,
    default_guidance,
    generate_couplings,
)
from ..ode import SOLVERS, SPACINGS
from ..sampling import load_loras_into_pipeline
from ..toy.world import TOY_GUIDANCE
from ..training.preflight import load_model
from .common import parse_lora_spec
from .distill import cmd_reflow_train


def coupling_worker(args) -> tuple[int, int, str | None]:
    """``(shard_index, num_shards, device)``: the flags, else torchrun's ``RANK`` / ``WORLD_SIZE`` (each process
    then takes its own GPU, ``cuda:LOCAL_RANK``), else one worker."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.num_shards is not None or world <= 1:
        return args.shard_index, args.num_shards or 1, args.device
    device = args.device
    if device is None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else None
    return int(os.environ.get("RANK", "0")), world, device


def _cmd_couple(args):
    shard_index, num_shards, device = coupling_worker(args)
    pipe = load_model(args.model, key="--model", device=device)
    if args.lora:  # couplings of a student (InstaFlow's 2nd stage: the reflowed model's own ODE), LoRAs fused
        load_loras_into_pipeline(pipe, [parse_lora_spec(x) for x in args.lora], fuse=True)
    prompts, _ = read_prompts(args.prompts)
    guidance = 1.0 if args.lora and args.guidance is None else default_guidance(args.model, args.guidance, pipe)
    res = generate_couplings(pipe, prompts, args.out, num_steps=args.steps, solver=args.solver,
                             guidance_scale=guidance, num_windows=args.windows, seed=args.seed,
                             shard_size=args.shard_size, batch_size=args.batch_size, spacing=args.spacing,
                             storage_dtype=args.storage_dtype, model_id=args.model,
                             height=args.resolution, width=args.resolution, shard_index=shard_index,
                             num_shards=num_shards)
    part = f" [worker {shard_index} of {num_shards}]" if num_shards > 1 else ""
    print(f"{res.out_dir}{part}: {res.num_couplings} couplings ({len(res.shards_skipped)} shard(s) already done, "
          f"{len(res.shards_written)} written); {res.num_generated} generated in {res.seconds:.1f} s = "
          f"{res.couplings_per_second:.2f} couplings/s on {pipe.device} ({args.solver}, {args.steps} steps, "
          f"guidance {guidance}, K={args.windows})")


def _cmd_solver_error(args):
    def parse(spec):
        bits = spec.split(":")
        if len(bits) not in (2, 3):
            raise CouplingError(f"solver spec {spec!r}: expected SOLVER:STEPS or SOLVER:STEPS:SPACING")
        return (bits[0], int(bits[1]), *bits[2:])

    pipe = load_model(args.model, key="--model", device=args.device)
    prompts, _ = read_prompts(args.prompts)
    guidance = default_guidance(args.model, args.guidance, pipe)
    report = coupling_solver_error(pipe, prompts, [parse(s) for s in args.solvers.split(",")],
                                   reference=parse(args.reference), guidance_scale=guidance,
                                   num_windows=args.windows, seed=args.seed, batch_size=args.batch_size)
    ref = report["reference"]
    print(f"reference {ref['solver']}:{ref['steps']} ({ref['seconds']:.1f} s, data rms {ref['data_rms']:.3f}), "
          f"{report['num_prompts']} prompts, guidance {guidance}")
    print(f"{'solver':>8} {'steps':>6} {'spacing':>8} {'rmse':>10} {'max':>10} {'s/coupling':>11}")
    for r in report["results"]:
        print(f"{r['solver']:>8} {r['steps']:>6} {r['spacing']:>8} {r['rmse']:>10.5f} {r['rmse_max']:>10.5f} "
              f"{r['seconds_per_coupling']:>11.5f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def add_reflow_commands(subparsers) -> argparse.ArgumentParser:
    """Register ``reflow couple | train | solver-error`` on an argparse ``subparsers`` object."""
    r = subparsers.add_parser("reflow", help="reflow / PeRFlow: teacher couplings and rectified-flow LoRA training")
    rsub = r.add_subparsers(dest="reflow_command", required=True)

    def common(p, prompts_default):
        p.add_argument("--model", default="toy", help="'toy', a local pipeline directory or a hub id")
        p.add_argument("--prompts", default=prompts_default,
                       help="toy:N[:SEED] (seeded toy-world prompts) or a text file with one prompt per line")
        p.add_argument("--guidance", type=float, default=None,
                       help=f"CFG scale baked into the couplings (default: {TOY_GUIDANCE:g} for the toy teacher, else 7.5); FLUX: the "
                            "embedded guidance (default 3.5 with a guidance embedding, else 1: no CFG)")
        p.add_argument("--windows", type=int, default=1, help="K, the PeRFlow windows (1 = InstaFlow-style reflow)")
        p.add_argument("--seed", type=int, default=0, help="coupling i uses noise seed SEED + i")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--device", default=None, help="default: cuda when available, else cpu")

    c = rsub.add_parser("couple", help="generate (or resume) teacher couplings")
    common(c, "toy:1024")
    c.add_argument("--out", required=True, help="couplings directory (resumable)")
    c.add_argument("--steps", type=int, default=25, help="ODE steps (>= windows)")
    c.add_argument("--solver", choices=SOLVERS, default="ddim")
    c.add_argument("--spacing", choices=SPACINGS, default="sigma",
                   help="steps inside a window: uniform in flow time, or in the teacher's own clock")
    c.add_argument("--shard-size", type=int, default=256)
    c.add_argument("--storage-dtype", choices=sorted(STORAGE_DTYPES), default="float16",
                   help="dtype of the stored latents (float16: half the disk and RAM of float32)")
    c.add_argument("--shard-index", type=int, default=0,
                   help="this worker's part: it generates the file shards j with j %% NUM_SHARDS == SHARD_INDEX "
                        "(workers may share --out; under torchrun: RANK)")
    c.add_argument("--num-shards", type=int, default=None,
                   help="how many workers split the set (default 1; under torchrun: WORLD_SIZE)")
    c.add_argument("--lora", action="append", default=[],
                   help="PATH[:WEIGHT], fused into the model first: couplings of a student (e.g. the reflow LoRA, "
                        "for the one-step distillation stage; guidance then defaults to 1)")
    c.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels (default: the model's own, e.g. 512 for SD 1.5, 1024 for SDXL/SD3/FLUX)")
    c.set_defaults(func=_cmd_couple)

    t = rsub.add_parser("train", help="train a reflow LoRA on couplings (a YAML recipe + key=value overrides)")
    t.add_argument("config", nargs="?", default=None, help="YAML recipe (optional)")
    t.add_argument("overrides", nargs="*", default=[], help="key=value config overrides, e.g. max_train_steps=500")
    t.add_argument("--couplings", default=None, help="shorthand for couplings_dir=DIR")
    t.add_argument("--resume", default=None, help="'latest' or a checkpoint directory: continue that run")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    t.set_defaults(func=cmd_reflow_train)

    e = rsub.add_parser("solver-error", help="RMSE of cheap coupling solvers against a many-step reference")
    common(e, "toy:16")
    e.add_argument("--solvers", default="ddim:10,ddim:25,dpmpp:10,dpmpp:25,euler:25",
                   help="comma-separated SOLVER:STEPS[:SPACING]")
    e.add_argument("--reference", default="ddim:1000", help="SOLVER:STEPS[:SPACING] of the reference solve")
    e.add_argument("--json", default=None, help="also write the report here")
    e.set_defaults(func=_cmd_solver_error)
    return r
