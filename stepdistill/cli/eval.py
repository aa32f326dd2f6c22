"""`stepdistill eval`: quality and time vs. steps for the teacher and any LoRA students."""
from __future__ import annotations

import argparse

from ..eval.evaluate import evaluate
from ..eval.specs import SPEC_HELP, STUDENT_STEPS, TEACHER_STEPS


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


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


def cmd_eval(args):
    evaluate(args.out, methods=args.method or ["teacher"], model=args.model, prompts=args.prompts, seed=args.seed,
             prompt_seed=args.prompt_seed, student_steps=args.student_steps, teacher_steps=args.teacher_steps,
             teacher_guidance=args.teacher_guidance, inception_weights=args.inception_weights,
             clip_model=args.clip_model, reference_images=args.reference_images, grid_prompts=args.grid_prompts,
             batch_size=args.batch_size, device=args.device)


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
    e.add_argument("--teacher-guidance", type=float, default=None, help="CFG scale of the base model (toy prompts: 5, else 7.5)")
    e.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth for FID")
    e.add_argument("--reference-images", default=None, help="folder of reference images for FID (toy prompts: rendered scenes)")
    e.add_argument("--clip-model", default=None, help="local CLIP model directory for CLIP score")
    e.add_argument("--grid-prompts", type=int, default=8, help="columns of grid-<method>.png")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default=None)
    e.add_argument("--out", default="out/eval")
    e.set_defaults(func=cmd_eval)
    return e
