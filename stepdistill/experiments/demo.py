"""The main job on the embedded world: distill the toy teacher into few-step LoRAs and compare.

``run_demo`` evaluates the teacher (50 guided DDIM steps, and its own 8/4/2/1-step DDIM), distills an
LCM-LoRA (with ``method="reflow"`` a reflow LoRA, with ``method="adversarial"`` an adversarial LoRA: LCD + a GAN
term on the teacher's features; ``"all"``: the three), evaluates each student at 8/4/2/1 steps with its own
sampler beside its baseline, and writes ``grid.png`` (side by side), ``report.json``, ``report.txt`` and the
adapters (``lora/``, ``lora-reflow/``, ``lora-adversarial/``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..atomic import atomic_write_json, atomic_write_text
from ..eval import metrics
from ..models.pipeline import load_pipeline
from ..sampling import generate, image_grid, load_loras_into_pipeline, set_scheduler
from ..toy.world import TOY_GUIDANCE, TOY_TEACHER_STEPS, evaluation_prompts, toy_recipe
from ..training.config import load_config
from ..training.loop import train
from .reflow_demo import run_reflow_demo

STUDENT_STEPS = (8, 4, 2, 1)
BASELINE_GRID_STEPS = (2, 1)  # baseline rows shown in the grid (all steps are in the report)


def evaluate_cell(pipe, prompts, steps, guidance, seed=0):
    images, sec = generate(pipe, prompts, steps=steps, guidance=guidance, seed=seed)
    cell = metrics.toy_metrics(images, prompts)
    cell["sec_per_image"] = sec
    return cell, images


def evaluate_teacher(pipe, prompts, step_counts=(TOY_TEACHER_STEPS, *STUDENT_STEPS), guidance=TOY_GUIDANCE, seed=0):
    """Teacher with DDIM and guidance (trailing timestep spacing below 25 steps, as few-step DDIM is fairest)."""
    report, rows = {}, {}
    for steps in step_counts:
        set_scheduler(pipe, "ddim", trailing=steps < 25)
        report[str(steps)], rows[steps] = evaluate_cell(pipe, prompts, steps, guidance, seed)
    return report, rows


def evaluate_student(pipe, prompts, scheduler_setter, guidance=1.0, step_counts=STUDENT_STEPS, seed=0):
    scheduler_setter(pipe)
    report, rows = {}, {}
    for steps in step_counts:
        report[str(steps)], rows[steps] = evaluate_cell(pipe, prompts, steps, guidance, seed)
    return report, rows


def lcd_scheduler(pipe):
    set_scheduler(pipe, "lcm")


def _report_rows(report: dict):
    """(label, cells) of every table block: the teacher, each student, and each student's baseline."""
    for method, cells in report.items():
        if method == "baseline":
            continue
        yield method, cells
        if method in report.get("baseline", {}):
            yield f"{method}:base", report["baseline"][method]


def format_report(report: dict) -> str:
    """The demo table: each student's rows followed by its baseline (the base model, no adapter, the student's
    own sampler and guidance, same steps)."""
    lines = [(f"{'method':12s} {'steps':>5s} {'prompt_acc':>10s} {'toy_fid':>8s} {'prec':>5s} {'recall':>6s} "
              f"{'s/img':>8s}")]
    for method, cells in _report_rows(report):
        for steps, c in sorted(((k, v) for k, v in cells.items() if k.isdigit()), key=lambda kv: -int(kv[0])):
            extra = f" straightness {c['straightness']:.4f}" if "straightness" in c else ""
            lines.append(f"{method:12s} {steps:>5s} {c['prompt_accuracy']:10.3f} {c['toy_fid']:8.2f} "
                         f"{c.get('precision', float('nan')):5.2f} {c.get('recall', float('nan')):6.2f} "
                         f"{c['sec_per_image']:8.4f}{extra}")
    return "\n".join(lines)


def distill_lcd(out_dir: Path, device: str | None = None, **overrides) -> tuple[Path, float]:
    """Train the packaged toy LCM-LoRA recipe (``configs/toy-lcm-lora.yaml``) into ``out_dir``."""
    t0 = time.perf_counter()
    path = train(load_config(toy_recipe("lcm-lora"), output_dir=str(out_dir), overwrite=True, **overrides))
    return path, time.perf_counter() - t0


DEMO_METHODS = ("lcd", "reflow", "adversarial")  # `--method all`; ``method`` may also list some: "lcd,reflow"


def distill_adversarial(out_dir: Path, device: str | None = None, **overrides) -> tuple[Path, float]:
    """Train the packaged toy adversarial recipe (``configs/toy-adversarial.yaml``) into ``out_dir``."""
    t0 = time.perf_counter()
    path = train(load_config(toy_recipe("adversarial"), output_dir=str(out_dir), overwrite=True, **overrides))
    return path, time.perf_counter() - t0


def run_demo(out_dir: str | Path, n_prompts: int = 200, device: str | None = None, seed: int = 0,
             method: str = "lcd", grid_prompts: int = 10, lcd_overrides: dict | None = None,
             reflow_overrides: dict | None = None, adversarial_overrides: dict | None = None,
             teacher_steps: tuple[int, ...] = (TOY_TEACHER_STEPS, *STUDENT_STEPS)) -> dict:
    """The demo into ``out_dir`` (module docstring); ``teacher_steps``: the step counts of the teacher's rows (its
    guided DDIM; the students' margins are over their baselines, so a shortened run may leave out the 50 steps)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = evaluation_prompts(n_prompts, seed=seed)
    pipe = load_pipeline("toy", device=device)
    report, grid_rows, labels = {}, [], []
    teacher, rows = evaluate_teacher(pipe, prompts, step_counts=teacher_steps, seed=seed)
    report["teacher"] = teacher
    for steps, imgs in rows.items():
        grid_rows.append(imgs[:grid_prompts])
        labels.append(f"teacher DDIM {steps}")

    baseline = report["baseline"] = {}
    methods = DEMO_METHODS if method == "all" else tuple(m.strip() for m in method.split(","))
    if "lcd" in methods:
        # the honest baseline: the base model with no adapter under the student's own sampler and guidance
        baseline["lcd"], rows = evaluate_student(pipe, prompts, lcd_scheduler, seed=seed)
        for steps in BASELINE_GRID_STEPS:
            grid_rows.append(rows[steps][:grid_prompts])
            labels.append(f"base LCM {steps}")
        lora_dir, train_seconds = distill_lcd(out / "lora", device=device, **(lcd_overrides or {}))
        student = load_pipeline("toy", device=device)
        load_loras_into_pipeline(student, [(str(lora_dir), 1.0)])  # stock load_lora_weights + layer check
        cells, rows = evaluate_student(student, prompts, lcd_scheduler, seed=seed)
        report["lcd"] = {**cells, "train_seconds": train_seconds}
        for steps, imgs in rows.items():
            grid_rows.append(imgs[:grid_prompts])
            labels.append(f"LCM-LoRA {steps}")

    if "reflow" in methods:
        cells, rows, baseline["reflow"], base_rows = run_reflow_demo(out, prompts, device=device, seed=seed,
                                                                     **(reflow_overrides or {}))
        for steps in BASELINE_GRID_STEPS:
            grid_rows.append(base_rows[steps][:grid_prompts])
            labels.append(f"base flow {steps}")
        report["reflow"] = cells
        for steps, imgs in rows.items():
            grid_rows.append(imgs[:grid_prompts])
            labels.append(f"reflow {steps}")

    if "adversarial" in methods:  # an LCD student with the GAN term: LCMScheduler, so LCD's baseline
        if "lcd" not in baseline:
            baseline["lcd"], _ = evaluate_student(pipe, prompts, lcd_scheduler, seed=seed)
        baseline["adversarial"] = baseline["lcd"]
        lora_dir, train_seconds = distill_adversarial(out / "lora-adversarial", device=device,
                                                      **(adversarial_overrides or {}))
        student = load_pipeline("toy", device=device)
        load_loras_into_pipeline(student, [(str(lora_dir), 1.0)])
        cells, rows = evaluate_student(student, prompts, lcd_scheduler, seed=seed)
        report["adversarial"] = {**cells, "train_seconds": train_seconds}
        for steps, imgs in rows.items():
            grid_rows.append(imgs[:grid_prompts])
            labels.append(f"adversarial {steps}")

    grid = image_grid(grid_rows, row_labels=labels, col_labels=list(prompts[:grid_prompts]),
                      scale=3)
    grid.save(out / "grid.png")
    atomic_write_json(out / "grid.json", {"columns": list(prompts[:grid_prompts]), "rows": labels})
    report_path = out / "report.json"
    if report_path.exists():  # keep the other methods' entries of an earlier run into the same DIR
        try:
            earlier = json.loads(report_path.read_text())
        except json.JSONDecodeError:
            earlier = {}
        report = {**earlier, **report, "baseline": {**earlier.get("baseline", {}), **baseline}}  # dict order: the earlier run's methods first, then this run's new ones
    atomic_write_text(report_path, json.dumps(report, indent=2))
    text = format_report(report)
    (out / "report.txt").write_text(text + "\n")
    print(text)
    print(f"wrote {out / 'grid.png'} (prompts in grid.json), {out / 'report.json'}")
    return report
