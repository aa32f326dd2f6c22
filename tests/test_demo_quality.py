"""Issue acceptance on the embedded world (v2), from one shortened ``stepdistill demo`` run of LCD and reflow (the
adversarial student has its own short demo test in tests/test_adversarial.py).

Every quality assertion compares a student with its *baseline*: the same base model with no adapter, under
the student's own sampler and guidance, at the same steps (``report["baseline"]``). A negative control
proves the margins can fail: untrained adapters (the recipes' LoRA at initialisation, saved and loaded
through the same path) are evaluated the same way and must fail every margin check.
"""
import json

import pytest

from stepdistill.experiments.demo import evaluate_student, lcd_scheduler, run_demo
from stepdistill.experiments.reflow_demo import evaluate_flow
from stepdistill.models.pipeline import load_pipeline
from stepdistill.sampling import load_loras_into_pipeline
from stepdistill.toy.world import TOY_GUIDANCE, evaluation_prompts, toy_recipe
from stepdistill.training.config import load_config
from stepdistill.training.loop import train

pytestmark = pytest.mark.slow

N_PROMPTS = 96
# Margins over the baseline, per method: steps whose toy-FID must be at most FID_RATIO x the baseline's,
# steps whose precision must be PRECISION_GAIN above it, steps whose mean per-attribute accuracy
# (attribute_accuracy) must be ACC_GAIN above it.
# (Recorded shortened run, 2026-11-30, docs/results.md: LCM-LoRA toy-FID 0.34x / 0.51x the baseline's at 2 / 4 steps,
# precision +0.29 / +0.15, attribute accuracy +0.07 at 2 steps; reflow 0.46x / 0.57x at 1 / 2 steps, precision +0.32
# and attribute accuracy +0.08 at 1 step, straightness 0.49x the base model's at guidance 1. From 384 couplings instead
# of 512, 2026-12-01: reflow 0.45x / 0.61x, precision +0.38, attribute accuracy +0.084 at 1 step, straightness 0.53x.
# The LCD run is the recorded one; on half its data pool, toy:2000, it missed the 4-step precision and the 2-step
# accuracy margins, so it keeps toy:4000.)
MARGINS = {
    "lcd": {"fid": ("2", "4"), "precision": ("2", "4"), "accuracy": ("2",)},
    "reflow": {"fid": ("1", "2"), "precision": ("1",), "accuracy": ("1",)},
}
FID_RATIO = 0.8
PRECISION_GAIN = 0.04
ACC_GAIN = 0.04
STRAIGHTNESS_RATIO = 0.7
STUDENT_STEPS = {"lcd": (4, 2), "reflow": (8, 2, 1)}  # steps the negative control evaluates


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # the teacher's rows at the students' step counts only: no margin reads its 50-step row (~20 s here)
    return run_demo(out, n_prompts=N_PROMPTS, device="cpu", method="lcd,reflow", lcd_overrides={"max_train_steps": 300},
                    reflow_overrides={"num_couplings": 384, "max_train_steps": 160}, teacher_steps=(8, 4, 2, 1)), out


def attribute_accuracy(cell: dict) -> float:
    """The mean of the per-attribute accuracies (``acc_shape``, ``acc_color``, ...: each over the prompts that name
    the attribute). Whole-prompt accuracy is not used for a margin: with the teacher itself at ~0.2 (it does not
    follow shape and position yet), few-step cells sit at 2-10 of 96 prompts, a binomial standard error of ~0.02,
    so a +0.04 margin on it was ~1.5 standard errors (a reflow 1-step student at 5/96 against 2/96 failed it while
    beating its baseline on colour, count, size and texture by 0.1-0.25)."""
    accs = [v for k, v in cell.items() if k.startswith("acc_")]
    assert accs, f"no per-attribute accuracies in {sorted(cell)}"
    return sum(accs) / len(accs)


def margin_failures(student: dict, baseline: dict, method: str) -> list[str]:
    """Every margin of ``MARGINS[method]`` the student misses over its baseline (empty: it clears them all)."""
    fails, m = [], MARGINS[method]
    for n in m["fid"]:
        if not student[n]["toy_fid"] <= FID_RATIO * baseline[n]["toy_fid"]:
            fails.append(f"{n} steps: toy-FID {student[n]['toy_fid']:.1f} > {FID_RATIO} x {baseline[n]['toy_fid']:.1f}")
    for n in m["precision"]:
        if not student[n]["precision"] >= baseline[n]["precision"] + PRECISION_GAIN:
            fails.append(f"{n} steps: precision {student[n]['precision']:.2f} < {baseline[n]['precision']:.2f} "
                         f"+ {PRECISION_GAIN}")
    for n in m["accuracy"]:
        if not attribute_accuracy(student[n]) >= attribute_accuracy(baseline[n]) + ACC_GAIN:
            fails.append(f"{n} steps: attribute accuracy {attribute_accuracy(student[n]):.3f} < "
                         f"{attribute_accuracy(baseline[n]):.3f} + {ACC_GAIN}")
    return fails


def n_margins(method: str) -> int:
    return sum(len(v) for v in MARGINS[method].values())


def straightness_failures(student: dict) -> list[str]:
    """Rectified Flow straightness of the student's trajectories against the base model's at the same guidance."""
    s, t = student["8"]["straightness"], student["teacher_straightness"]
    return [] if s <= STRAIGHTNESS_RATIO * t else [f"straightness {s:.1f} > {STRAIGHTNESS_RATIO} x base {t:.1f}"]


def test_lcm_lora_beats_its_baseline(demo_report):
    report, _ = demo_report
    assert margin_failures(report["lcd"], report["baseline"]["lcd"], "lcd") == []


def test_reflow_student_beats_its_baseline_and_is_straighter(demo_report):
    report, _ = demo_report
    assert margin_failures(report["reflow"], report["baseline"]["reflow"], "reflow") == []
    assert straightness_failures(report["reflow"]) == []


@pytest.fixture(scope="module")
def untrained_adapters(demo_report, tmp_path_factory):
    """The packaged recipes' adapters at initialisation (one step at learning rate 0), evaluated like the students."""
    _, out = demo_report
    tmp = tmp_path_factory.mktemp("untrained")
    prompts = evaluation_prompts(N_PROMPTS, seed=0)
    cells = {}
    lcd = train(load_config(toy_recipe("lcm-lora"), output_dir=str(tmp / "lcd"), train_data="toy:64",
                            max_train_steps=1, learning_rate=0.0, checkpointing_steps=0))
    pipe = load_pipeline("toy", device="cpu")
    load_loras_into_pipeline(pipe, [(str(lcd), 1.0)])
    cells["lcd"], _ = evaluate_student(pipe, prompts, lcd_scheduler, step_counts=STUDENT_STEPS["lcd"])
    config = load_config(toy_recipe("reflow"), output_dir=str(tmp / "reflow"), couplings_dir=str(out / "couplings"),
                         max_train_steps=1, learning_rate=0.0, checkpointing_steps=0)
    reflow = train(config)
    pipe = load_pipeline("toy", device="cpu")
    load_loras_into_pipeline(pipe, [(str(reflow), 1.0)])
    cells["reflow"], _ = evaluate_flow(pipe, prompts, config.reflow_windows, step_counts=STUDENT_STEPS["reflow"])
    cells["reflow"]["teacher_straightness"] = demo_report[0]["reflow"]["teacher_straightness"]
    return cells


def test_negative_control_untrained_adapters_fail_every_margin(demo_report, untrained_adapters):
    """The margins above are not vacuous: an adapter that does nothing fails each of them."""
    report, _ = demo_report
    lcd_fails = margin_failures(untrained_adapters["lcd"], report["baseline"]["lcd"], "lcd")
    reflow_fails = margin_failures(untrained_adapters["reflow"], report["baseline"]["reflow"], "reflow")
    assert len(lcd_fails) == n_margins("lcd"), lcd_fails
    assert len(reflow_fails) == n_margins("reflow"), reflow_fails
    assert straightness_failures(untrained_adapters["reflow"]) != []


def test_demo_writes_grid_report_baselines_and_loras(demo_report):
    report, out = demo_report
    assert (out / "grid.png").stat().st_size > 1000
    assert json.loads((out / "grid.json").read_text())["columns"] == evaluation_prompts(N_PROMPTS)[:10]
    on_disk = json.loads((out / "report.json").read_text())
    assert set(on_disk) == {"teacher", "baseline", "lcd", "reflow"}
    for method in ("lcd", "reflow"):
        for block in (on_disk[method], on_disk["baseline"][method]):
            for steps in ("1", "2", "4", "8"):
                assert {"prompt_accuracy", "toy_fid", "precision", "recall", "sec_per_image"} <= set(block[steps])
    assert all("straightness" in on_disk["reflow"][steps] for steps in ("1", "2", "4", "8"))
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (out / "lora-reflow" / "pytorch_lora_weights.safetensors").exists()


def test_sample_command_picks_each_adapters_sampler_and_writes_a_grid(demo_report, tmp_path, capsys):
    from PIL import Image

    from stepdistill.cli import main

    _, out = demo_report
    prompt = "a large red circle on the left"
    cases = [([], "ddim", f"guidance {TOY_GUIDANCE}"),
             (["--lora", str(out / "lora")], "lcm", "guidance 1.0"),
             (["--lora", str(out / "lora-reflow"), "--fuse"], "perflow", "guidance 1.0"),
             (["--lora", str(out / "lora"), "--lora", f"{out / 'lora-reflow'}:0.5"], "lcm", "guidance 1.0")]
    for i, (lora_args, sampler, guidance) in enumerate(cases):
        grid = tmp_path / f"grid{i}.png"
        main(["sample", "--model", "toy", "--prompt", prompt, "--steps", "2", "--num-images", "2",
              "--device", "cpu", "--out", str(grid), *lora_args])
        printed = capsys.readouterr().out
        assert f"2 steps ({sampler})" in printed and guidance in printed, printed
        assert Image.open(grid).size[0] > 128
