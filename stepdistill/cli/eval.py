"""`stepdistill eval`: quality and time vs. steps for the teacher and any LoRA students."""
from __future__ import annotations

import argparse
import sys

from ..data.prompts import read_prompts
from ..errors import ConfigError
from ..eval.evaluate import are_toy_prompts, evaluate
from ..eval.specs import SPEC_HELP, STUDENT_STEPS, TEACHER_STEPS
from ..sampling import check_sampling_args
from ..training.preflight import check_model_source
from .common import check_at_least


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4, got {text!r}") from None


EVAL_EPILOG = """method specs (--method, repeatable; default: teacher):
  SPEC   := [NAME=][LORA[@WEIGHT][+LORA...]][:SAMPLER][:steps=1,2,4][:guidance=G][:windows=K][:eta=E]
  SAMPLER: ddim | lcm | tcd | perflow (PiecewiseRectifiedFlowScheduler; K from windows=, else the LoRA's
           stepdistill.num_windows metadata, else 4) | euler | dpmpp | pndm | flow_euler
  without LoRAs (teacher): DDIM (trailing spacing below 25 steps), --teacher-steps, --teacher-guidance
  with LoRAs (student):    sampler from the LoRA metadata (lcd -> lcm, reflow -> perflow), --student-steps, guidance 1

examples:
  stepdistill eval --method teacher --method lcd=out/demo/lora:lcm --method reflow=out/demo/lora-reflow:perflow
  stepdistill eval --prompts toy:100 --method teacher:ddim:steps=4,25,50 --method tcd=out/demo/lora:tcd:eta=0.3
  stepdistill eval --model DIR --prompts prompts.txt --clip-model CLIP_DIR --method teacher --method lcd=LORA
"""


def check_eval_args(args):
    """Refuse what would fail (or be silently wrong) after the model has loaded."""
    for name in ("student_steps", "teacher_steps"):
        steps = getattr(args, name)
        if not steps:
            raise ConfigError(f"--{name.replace('_', '-')} needs at least one step count, e.g. 1,2,4")
        for n in steps:
            check_sampling_args(n, 1.0, "--" + name.replace("_", "-"))
    if args.teacher_guidance is not None:
        check_sampling_args(1, args.teacher_guidance, guidance_name="--teacher-guidance")
    check_at_least(batch_size=(args.batch_size, 1), grid_prompts=(args.grid_prompts, 1))
    check_model_source(args.model, "--model")


def cmd_eval(args):
    check_eval_args(args)
    prompts, _ = read_prompts(args.prompts, seed=args.prompt_seed)  # a bad prompt source fails before any model
    # toy-FID needs 2 images: with one toy prompt the per-cell progress line has no FID to print
    verbose = len(prompts) >= 2 or not are_toy_prompts(prompts)
    results = evaluate(args.out, methods=args.method or ["teacher"], model=args.model, prompts=args.prompts,
                       seed=args.seed, prompt_seed=args.prompt_seed, student_steps=args.student_steps,
                       teacher_steps=args.teacher_steps, teacher_guidance=args.teacher_guidance,
                       inception_weights=args.inception_weights, clip_model=args.clip_model,
                       reference_images=args.reference_images, grid_prompts=args.grid_prompts,
                       batch_size=args.batch_size, device=args.device, verbose=verbose,
                       baselines=not args.no_baselines)
    if not verbose:
        print("warning: toy-FID needs at least 2 prompts (e.g. --prompts toy:100): reported as n/a", file=sys.stderr)
        print(summary(results))
        print(f"wrote {args.out}/results.json, results.md, quality_vs_steps.png, " + ", ".join(results["grids"].values()))


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def summary(results: dict) -> str:
    """One line per method and step count: prompt accuracy, toy-FID, seconds per image (``n/a`` where undefined)."""
    lines = []
    for name, method in results["methods"].items():
        for steps, cell in method["cells"].items():
            lines.append(f"{name:>12s} {method['sampler']:>7s} {int(steps):3d} steps: prompt_acc "
                         f"{_fmt(cell.get('prompt_accuracy'), '.3f')} toy_fid {_fmt(cell.get('toy_fid'), '.2f')} "
                         f"{cell['sec_per_image']:.4f} s/img")
    return "\n".join(lines)


def add_eval_command(subparsers):
    """Register ``stepdistill eval`` on an argparse subparsers object."""
    e = subparsers.add_parser(
        "eval", help="quality (prompt accuracy, toy-FID, FID, CLIP) and time vs. steps for teacher and LoRA students",
        description="Sample a fixed prompt set with fixed per-image seeds for each method at each of its step counts; "
                    "report prompt accuracy and toy-FID (toy prompts), FID / CLIP score (with local weights) and "
                    "seconds per image. Writes results.json, results.md, quality_vs_steps.png, grid-<method>.png.",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--model", default="toy", help="'toy', a local pipeline directory or a hub id")
    e.add_argument("--method", action="append", default=[], metavar="SPEC",
                   help=f"repeat per method (default: teacher). {SPEC_HELP}")
    e.add_argument("--prompts", default="toy:200", help="'toy:N' (fixed toy evaluation prompts) or a text file, one prompt a line")
    e.add_argument("--prompt-seed", type=int, default=0, help="seed of the toy prompt set")
    e.add_argument("--seed", type=int, default=0, help="image i starts from noise seed SEED+i")
    e.add_argument("--student-steps", type=_int_list, default=STUDENT_STEPS, help="default steps of LoRA methods (1,2,4,8)")
    e.add_argument("--teacher-steps", type=_int_list, default=TEACHER_STEPS, help="default steps of the base model (25,50)")
    e.add_argument("--teacher-guidance", type=float, default=None, help="CFG scale of the base model (toy prompts: the toy teacher's, 2; else 7.5)")
    e.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth for FID")
    e.add_argument("--reference-images", default=None, help="folder of reference images for FID (toy prompts: rendered scenes)")
    e.add_argument("--clip-model", default=None, help="local CLIP model directory for CLIP score")
    e.add_argument("--grid-prompts", type=int, default=8, help="columns of grid-<method>.png")
    e.add_argument("--no-baselines", action="store_true",
                   help="do not add <student>-base rows (the base model, no adapter, under each student's sampler, "
                        "steps and guidance)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default=None)
    e.add_argument("--out", default="out/eval")
    e.set_defaults(func=cmd_eval)
    return e
