"""Issue acceptance on the embedded world, from one shortened ``stepdistill demo --method all`` run: a short
LCM-LoRA distillation of the committed toy teacher must sample far better in 2-4 steps than the teacher's own
DDIM at those steps and come close to its 50-step figures; a short reflow (PeRFlow, K = 2) LoRA must beat the
teacher at 1 and 2 steps and straighten its trajectories. (The full demo recipes train longer; these margins
hold for the shortened runs used here: recorded figures in docs/results.md.)"""
import pytest

from stepdistill.experiments.demo import run_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(out, n_prompts=96, device="cpu", method="all", lcd_overrides={"max_train_steps": 300},
                    reflow_overrides={"num_couplings": 512, "max_train_steps": 160}), out


def test_few_step_student_beats_teacher_at_equal_steps_and_nears_fifty(demo_report):
    report, _ = demo_report
    teacher, student = report["teacher"], report["lcd"]
    # 2 steps: the teacher's DDIM falls apart, the student does not (recorded run: 0.975 vs 0.435, FID 64 vs 302)
    assert student["2"]["prompt_accuracy"] >= teacher["2"]["prompt_accuracy"] + 0.3
    assert student["2"]["toy_fid"] <= 0.5 * teacher["2"]["toy_fid"]
    # 4 steps: at least the teacher's own 4-step accuracy, and close to its 50-step figures
    assert student["4"]["prompt_accuracy"] >= teacher["4"]["prompt_accuracy"]
    assert student["4"]["prompt_accuracy"] >= teacher["50"]["prompt_accuracy"] - 0.15
    assert student["4"]["toy_fid"] <= 2.0 * teacher["50"]["toy_fid"]


def test_demo_writes_grid_report_and_lora(demo_report):
    import json

    report, out = demo_report
    assert (out / "grid.png").stat().st_size > 1000
    on_disk = json.loads((out / "report.json").read_text())
    assert set(on_disk) == {"teacher", "lcd", "reflow"}
    for method in ("lcd", "reflow"):
        assert set(on_disk[method]) >= {"1", "2", "4", "8"}
        for steps in ("1", "2", "4", "8"):
            assert {"prompt_accuracy", "toy_fid", "sec_per_image"} <= set(on_disk[method][steps])
    assert all("straightness" in on_disk["reflow"][steps] for steps in ("1", "2", "4", "8"))
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (out / "lora-reflow" / "pytorch_lora_weights.safetensors").exists()


def test_reflow_student_beats_the_teacher_at_one_and_two_steps_and_is_straighter(demo_report):
    report, _ = demo_report
    teacher, student = report["teacher"], report["reflow"]
    # recorded shortened run (96 prompts): reflow 2 steps 0.958 vs teacher ~0.44; 1 step 0.656 vs ~0.18
    for steps, gain in (("2", 0.3), ("1", 0.25)):
        assert student[steps]["prompt_accuracy"] >= teacher[steps]["prompt_accuracy"] + gain
        assert student[steps]["toy_fid"] <= 0.6 * teacher[steps]["toy_fid"]
    # 4 steps: close to the teacher's 50-step accuracy
    assert student["4"]["prompt_accuracy"] >= teacher["50"]["prompt_accuracy"] - 0.1
    # Rectified Flow straightness under the same 8-step flow sampler (recorded: 60 vs 582)
    assert student["8"]["straightness"] <= 0.5 * student["teacher_straightness"]


def test_sample_command_picks_each_adapters_sampler_and_writes_a_grid(demo_report, tmp_path, capsys):
    from PIL import Image

    from stepdistill.cli import main

    _, out = demo_report
    prompt = "a large red circle on the left on a gray background"
    cases = [([], "ddim", "guidance 5.0"),
             (["--lora", str(out / "lora")], "lcm", "guidance 1.0"),
             (["--lora", str(out / "lora-reflow"), "--fuse"], "perflow", "guidance 1.0"),
             (["--lora", str(out / "lora"), "--lora", f"{out / 'lora-reflow'}:0.5"], "lcm", "guidance 1.0")]
    for i, (lora_args, sampler, guidance) in enumerate(cases):
        grid = tmp_path / f"grid{i}.png"
        main(["sample", "--model", "toy", "--prompt", prompt, "--steps", "2", "--num-images", "2",
              "--device", "cpu", "--out", str(grid), *lora_args])
        printed = capsys.readouterr().out
        assert f"2 steps ({sampler})" in printed and guidance in printed, printed
        assert Image.open(grid).size[0] > 64
