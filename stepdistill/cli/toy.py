"""Commands of the embedded toy world: `stepdistill demo`, and the style-LoRA stacking experiments
(`train-style`, `stack-eval`, `transfer-eval`)."""
from __future__ import annotations

from pathlib import Path

from ..experiments.demo import run_demo
from ..experiments.stacking import (ACCEL_WEIGHTS, SHIFTS, STYLE_WEIGHTS, FinetuneRecipe, finetune_base,
                                    stack_sweep, transfer_eval)
from ..experiments.style import StyleRecipe, train_style_lora
from .smoke import TOY_ITEMS, smoke_enabled, training_overrides


def cmd_demo(args):
    sizes = {}
    if smoke_enabled():  # STEPDISTILL_SMOKE=1: the recipes' training shrinks too (cli/smoke.py)
        sizes = {"lcd_overrides": training_overrides(),
                 "reflow_overrides": {"num_couplings": TOY_ITEMS, **training_overrides(None)},
                 "adversarial_overrides": training_overrides()}
    run_demo(args.out, n_prompts=args.num_prompts, device=args.device, seed=args.seed, method=args.method, **sizes)


def add_demo_command(subparsers):
    d = subparsers.add_parser("demo", help="the main job on the embedded toy world")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--num-prompts", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--method", default="lcd", choices=["teacher", "lcd", "reflow", "adversarial", "all"])
    d.add_argument("--device", default=None)
    d.set_defaults(func=cmd_demo)
    return d


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def cmd_train_style(args):
    recipe = StyleRecipe(style=args.style, steps=args.steps, batch_size=args.batch_size, rank=args.rank,
                         learning_rate=args.learning_rate, n_images=args.n_images, seed=args.seed)
    path = train_style_lora(args.base, args.out, recipe, device=args.device or "cpu")
    print(f"style LoRA written to {path}")


def cmd_stack_eval(args):
    report = stack_sweep(args.base, args.style, args.accel, args.out, n_prompts=args.num_prompts,
                         accel_weights=_floats(args.accel_weights), style_weights=_floats(args.style_weights),
                         steps=args.steps, seed=args.seed, device=args.device or "cpu", n_reference=args.n_reference)
    b = report["recommended"]
    print(f"wrote {args.out}/results.json, results.md, grid.png; recommended accel {b.get('accel_weight')} "
          f"+ style {b.get('style_weight')}")


def cmd_transfer_eval(args):
    finetuned = args.finetuned
    if finetuned is None:
        finetuned = str(finetune_base(args.base, Path(args.out) / "finetuned",
                                      FinetuneRecipe(shift=args.shift, style=args.finetune_style,
                                                     steps=args.finetune_steps, n_images=args.finetune_images,
                                                     seed=args.seed),
                                      device=args.device or "cpu"))
    transfer_eval(args.base, finetuned, args.accel, args.out, n_prompts=args.num_prompts, steps=args.steps,
                  seed=args.seed, device=args.device or "cpu")
    print(f"wrote {args.out}/results.json, results.md, grid.png")


def _run_options(p, out: str, num_prompts: int | None = 96, steps: int = 4):
    p.add_argument("--out", default=out)
    if num_prompts is not None:
        p.add_argument("--num-prompts", type=int, default=num_prompts)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)


def add_stacking_commands(subparsers):
    t = subparsers.add_parser("train-style", help="train the toy hollow-style LoRA (epsilon fine-tuning)")
    t.add_argument("--style", default="hollow", choices=["hollow", "outline"])
    t.add_argument("--base", default="toy")
    _run_options(t, "out/style-hollow", num_prompts=None, steps=500)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--learning-rate", type=float, default=1e-3)
    t.add_argument("--n-images", type=int, default=3000)
    t.set_defaults(func=cmd_train_style)

    s = subparsers.add_parser("stack-eval", help="sweep acceleration x style LoRA weights: style strength and accuracy")
    s.add_argument("--base", default="toy")
    s.add_argument("--style", required=True, help="style LoRA file or directory")
    s.add_argument("--accel", required=True, help="acceleration (LCM) LoRA file or directory")
    _run_options(s, "out/stack")
    s.add_argument("--accel-weights", default=",".join(map(str, ACCEL_WEIGHTS)))
    s.add_argument("--style-weights", default=",".join(map(str, STYLE_WEIGHTS)))
    s.add_argument("--n-reference", type=int, default=500,
                   help="real renders whose style strength (raw and through the VAE) the report gives as reference")
    s.set_defaults(func=cmd_stack_eval)

    r = subparsers.add_parser("transfer-eval", help="apply an acceleration LoRA to a fine-tuned base and compare")
    r.add_argument("--base", default="toy")
    r.add_argument("--accel", required=True)
    r.add_argument("--finetuned", default=None, help="fine-tuned pipeline dir (default: fine-tune --base now)")
    r.add_argument("--shift", default="large", choices=sorted(SHIFTS))
    r.add_argument("--finetune-style", default="none", choices=["none", "hollow"],
                   help="render the fine-tune data in a style (a stylised checkpoint)")
    r.add_argument("--finetune-steps", type=int, default=300)
    r.add_argument("--finetune-images", type=int, default=3000, help="scenes in the fine-tune's data pool")
    _run_options(r, "out/transfer")
    r.set_defaults(func=cmd_transfer_eval)
