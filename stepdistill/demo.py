"""The main job on the embedded world: evaluate the toy teacher (and, with distillation, its students),
writing ``grid.png`` and ``report.json`` into an output directory."""
from __future__ import annotations

import json
from pathlib import Path

from . import metrics
from .sampling import generate, image_grid, load_pipeline, set_scheduler
from .toy.world import TOY_GUIDANCE, TOY_TEACHER_STEPS, evaluation_prompts


def evaluate_cell(pipe, prompts, steps, guidance, seed=0) -> tuple[dict, "np.ndarray"]:
    images, sec = generate(pipe, prompts, steps=steps, guidance=guidance, seed=seed)
    cell = metrics.toy_metrics(images, prompts)
    cell["sec_per_image"] = sec
    return cell, images


def evaluate_teacher(pipe, prompts, step_counts=(TOY_TEACHER_STEPS,), guidance=TOY_GUIDANCE, seed=0):
    """Teacher with DDIM (trailing spacing for few steps, as LCM/TCD evaluate it) and guidance."""
    report, rows = {}, {}
    for steps in step_counts:
        set_scheduler(pipe, "ddim", trailing=steps < 25)
        report[str(steps)], rows[steps] = evaluate_cell(pipe, prompts, steps, guidance, seed)
    return report, rows


def format_report(report: dict) -> str:
    lines = [f"{'method':8s} {'steps':>5s} {'prompt_acc':>10s} {'toy_fid':>8s} {'s/img':>8s}"]
    for method, cells in report.items():
        for steps, c in sorted(cells.items(), key=lambda kv: -int(kv[0])):
            lines.append(f"{method:8s} {steps:>5s} {c['prompt_accuracy']:10.3f} {c['toy_fid']:8.2f} "
                         f"{c['sec_per_image']:8.4f}")
    return "\n".join(lines)


def run_demo(out_dir: str | Path, n_prompts: int = 200, device: str | None = None, seed: int = 0,
             grid_prompts: int = 12) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = evaluation_prompts(n_prompts, seed=seed)
    pipe = load_pipeline("toy", device=device)
    teacher, rows = evaluate_teacher(pipe, prompts, step_counts=(TOY_TEACHER_STEPS,), seed=seed)
    report = {"teacher": teacher}
    labels = [f"teacher {s} steps" for s in rows]
    grid = image_grid([rows[s][:grid_prompts] for s in rows], row_labels=labels,
                      col_labels=[p.replace("a ", "", 1) for p in prompts[:grid_prompts]], scale=3)
    grid.save(out / "grid.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    text = format_report(report)
    (out / "report.txt").write_text(text + "\n")
    print(text)
    return report
