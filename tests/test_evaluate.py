"""``stepdistill eval``: method specs, sampler resolution, and an end-to-end run on the toy world (the committed
toy teacher when present, else a tiny random SD-shaped pipeline) that writes every output and repeats its
quality numbers exactly under fixed seeds."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.cli.eval import cmd_eval
from stepdistill.eval import evaluate as ev
from stepdistill.eval.report import quality_numbers
from stepdistill.sampling import DEFAULT_NUM_WINDOWS
from stepdistill import lora
from stepdistill.toy.world import TOY_GUIDANCE, TOY_TEACHER_DIR, evaluation_prompts

N_PROMPTS = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small kernels: see tests/conftest.py


def _build_tiny_pipe():
    from stepdistill.toy.teacher import build_random_pipeline

    pipe = build_random_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model_and_loras(tmp_path_factory):
    """(model id, LCD LoRA dir, reflow LoRA file): the toy teacher when committed, else a tiny random pipeline;
    random non-zero LoRAs (so a student really differs from its base) with stepdistill metadata."""
    from stepdistill.models.pipeline import load_pipeline

    root = tmp_path_factory.mktemp("eval-model")
    if (TOY_TEACHER_DIR / "model_index.json").exists():
        model = "toy"
        pipe = load_pipeline("toy", device="cpu", dtype=torch.float32)
    else:
        model = str(root / "tiny-sd")
        _build_tiny_pipe().save_pretrained(model)
        pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    unet = pipe.unet
    lora.add_lora_to_unet(unet, rank=4)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    lcd_dir = root / "lora-lcd"
    lora.save_lora(lcd_dir, unet, metadata={"stepdistill.method": "lcd"})
    reflow_file = lora.save_lora(root / "reflow.safetensors", unet,
                                    metadata={"stepdistill.method": "reflow", "stepdistill.num_windows": 2})
    return model, str(lcd_dir), str(reflow_file)


# ------------------------------------------------------------------------------------------ spec syntax

def test_parse_method_specs():
    t = ev.parse_method("teacher")
    assert t.name == "teacher" and t.is_teacher and t.sampler is None and t.steps is None
    assert ev.parse_method("teacher:ddim").sampler == "ddim"
    s = ev.parse_method("lcd=out/lora:lcm")
    assert (s.name, s.loras, s.sampler, s.is_teacher) == ("lcd", [("out/lora", 1.0)], "lcm", False)
    s = ev.parse_method("mix=a/x.safetensors@0.5+b:tcd:steps=4,1:guidance=1.5:eta=0.3")
    assert s.loras == [("a/x.safetensors", 0.5), ("b", 1.0)]
    assert (s.sampler, s.steps, s.guidance, s.eta) == ("tcd", (4, 1), 1.5, 0.3)
    s = ev.parse_method("reflow=out/lora-reflow:perflow:windows=2")
    assert (s.sampler, s.num_windows) == ("perflow", 2)
    assert ev.parse_method("out/my-lora:lcm").name == "my-lora"  # name from the directory
    s = ev.parse_method("few=:ddim:steps=2,4")
    assert s.is_teacher and s.name == "few" and s.steps == (2, 4)


@pytest.mark.parametrize("bad", ["lcd=x:euler_a", "lcd=x:lcm:foo=1", "lcd=x:lcm:steps=0", "lcd=x@w:lcm",
                                 "bad name=x:lcm", "lcd=x:lcm:tcd", ""])
def test_parse_method_rejects_bad_specs(bad):
    with pytest.raises(ev.SpecError):
        ev.parse_method(bad)


def test_resolve_defaults_from_lora_metadata(model_and_loras):
    _, lcd_dir, reflow_file = model_and_loras
    r = ev.resolve_method(ev.parse_method(f"s={lcd_dir}"), (25, 50), (1, 2, 4, 8), 5.0)
    assert (r["sampler"], r["steps"], r["guidance"], r["num_windows"]) == ("lcm", [1, 2, 4, 8], 1.0, None)
    r = ev.resolve_method(ev.parse_method(f"r={reflow_file}"), (25, 50), (1, 2), 5.0)
    assert (r["sampler"], r["num_windows"]) == ("perflow", 2)  # K from stepdistill.num_windows
    r = ev.resolve_method(ev.parse_method(f"r={reflow_file}:perflow:windows=3"), (25, 50), (1, 2), 5.0)
    assert r["num_windows"] == 3  # the spec wins over the metadata
    r = ev.resolve_method(ev.parse_method(f"r={lcd_dir}:perflow"), (25, 50), (1, 2), 5.0)
    assert r["num_windows"] == DEFAULT_NUM_WINDOWS  # no metadata -> 4
    r = ev.resolve_method(ev.parse_method("teacher"), (25, 50), (1, 2), 5.0)
    assert (r["sampler"], r["steps"], r["guidance"]) == ("ddim", [25, 50], 5.0)
    with pytest.raises(FileNotFoundError):
        ev.resolve_method(ev.parse_method("x=/nonexistent/lora:lcm"), (25,), (1,), 5.0)


def test_perflow_sampler_gets_window_count(model_and_loras):
    from stepdistill.flow_scheduler import PiecewiseRectifiedFlowScheduler
    from stepdistill.models.pipeline import load_pipeline

    pipe = load_pipeline(model_and_loras[0], device="cpu", dtype=torch.float32)
    ev.apply_sampler(pipe, "perflow", 4, num_windows=2)
    sched = pipe.scheduler
    assert isinstance(sched, PiecewiseRectifiedFlowScheduler) and sched.config.num_windows == 2
    ev.apply_sampler(pipe, "ddim", 4)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"  # few-step DDIM
    ev.apply_sampler(pipe, "ddim", 50)
    assert pipe.scheduler.config.timestep_spacing != "trailing"


# ------------------------------------------------------------------------------------------ end to end

def _grid_rows_cols(path, n_rows, n_cols, tile):
    with Image.open(path) as im:
        w, h = im.size
    # image_grid: label column + n_cols * (tile + 2) wide; a header of wrapped prompts + n_rows * (tile + 2) high
    header = h - n_rows * (tile + 2)
    return 12 < header < 80 and w > n_cols * (tile + 2) and w < n_cols * (tile + 2) + 200


def test_evaluate_writes_outputs_and_repeats_exactly(model_and_loras, tmp_path):

    model, lcd_dir, _ = model_and_loras
    methods = ["teacher", f"lcd={lcd_dir}:lcm"]  # the student's baseline row (lcd-base) is added by default

    # first run through the command line (`stepdistill eval`, registered by add_eval_command)
    from stepdistill.cli import build_parser

    parser = build_parser()
    argv = ["eval", "--model", model, "--prompts", f"toy:{N_PROMPTS}", "--student-steps", "1,2",
            "--teacher-steps", "4", "--grid-prompts", "4", "--out", str(tmp_path / "a")]
    for m in methods:
        argv += ["--method", m]
    args = parser.parse_args(argv)
    assert args.func is cmd_eval
    args.func(args)

    a = json.loads((tmp_path / "a" / "results.json").read_text())
    assert list(a["methods"]) == ["teacher", "lcd", "lcd-base"]
    assert a["prompts"] == {"source": "toy:8 (evaluation_prompts seed 0)", "count": N_PROMPTS, "toy": True}
    t = a["methods"]["teacher"]
    assert (t["sampler"], t["steps"], t["guidance"]) == ("ddim", [4], TOY_GUIDANCE)
    s = a["methods"]["lcd"]
    assert (s["sampler"], s["steps"], s["guidance"], s["lora_methods"]) == ("lcm", [1, 2], 1.0, ["lcd"])
    for m in a["methods"].values():
        for cell in m["cells"].values():
            assert 0.0 <= cell["prompt_accuracy"] <= 1.0
            assert math.isfinite(cell["toy_fid"]) and cell["toy_fid"] > 0
            assert cell["sec_per_image"] > 0
            assert cell["fid"] is None and "fid" in cell["unavailable"]          # no --inception-weights
            assert cell["clip_score"] is None and "clip_score" in cell["unavailable"]  # no --clip-model
    # the baseline: the base model, no adapter, under the student's sampler, steps and guidance
    b = a["methods"]["lcd-base"]
    assert (b["sampler"], b["steps"], b["guidance"], b["loras"], b["baseline_of"]) == ("lcm", [1, 2], 1.0, [], "lcd")
    # the LoRA is really applied: same sampler, steps and seeds, with vs. without the adapter
    assert a["methods"]["lcd"]["cells"]["1"]["toy_fid"] != b["cells"]["1"]["toy_fid"]

    md = (tmp_path / "a" / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == 1 + 2 + 2
    assert rows[0].startswith(f"| teacher | ddim | 4 | {TOY_GUIDANCE:g} |") and "unavailable" in rows[0]
    assert "Unavailable metrics:" in md

    tile = 3 * 64  # 64 px images, scale 3
    assert _grid_rows_cols(tmp_path / "a" / "grid-teacher.png", 1, 4, tile)
    assert _grid_rows_cols(tmp_path / "a" / "grid-lcd.png", 2, 4, tile)
    with Image.open(tmp_path / "a" / "quality_vs_steps.png") as im:
        assert im.size[0] > 600 and np.asarray(im.convert("L")).std() > 10  # two panels, not a blank canvas

    # --no-baselines drops the <student>-base rows
    args = parser.parse_args(["eval", "--model", model, "--prompts", f"toy:{N_PROMPTS}", "--student-steps", "1",
                              "--grid-prompts", "2", "--method", methods[1], "--no-baselines",
                              "--out", str(tmp_path / "c")])
    args.func(args)
    assert list(json.loads((tmp_path / "c" / "results.json").read_text())["methods"]) == ["lcd"]

    # second run through the Python API: identical quality numbers (timings excluded)
    b = ev.evaluate(tmp_path / "b", methods=methods, model=model, prompts=f"toy:{N_PROMPTS}", student_steps=(1, 2),
                    teacher_steps=(4,), grid_prompts=4, verbose=False)
    assert quality_numbers(a) == quality_numbers(b)
    assert quality_numbers(a)["lcd"]["2"]["toy_fid"] == b["methods"]["lcd"]["cells"]["2"]["toy_fid"]


def test_seeded_generate_repeats_and_depends_on_seed(model_and_loras):
    """LCM at 2+ steps injects noise between steps: it must come from per-image seeds, not the global RNG."""
    from stepdistill.models.pipeline import load_pipeline

    model, _, _ = model_and_loras
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    ev.apply_sampler(pipe, "lcm", 2)
    prompts = evaluation_prompts(3)
    a, _ = ev.seeded_generate(pipe, prompts, steps=2, guidance=1.0, seed=0)
    torch.manual_seed(123)  # the global RNG must not matter
    b, _ = ev.seeded_generate(pipe, prompts, steps=2, guidance=1.0, seed=0)
    c, _ = ev.seeded_generate(pipe, prompts, steps=2, guidance=1.0, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # image i of seed 1 starts from the noise of image i+1 of seed 0, but the injected noise differs
    assert not np.array_equal(a[1], c[0])


def _tiny_clip_dir(path) -> str:
    """A random, tiny CLIP model + processor saved locally (what --clip-model expects), to exercise the wiring."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from stepdistill.toy.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(path)
    return str(path)


def test_non_toy_prompts_and_perflow(model_and_loras, tmp_path):
    model, _, reflow_file = model_and_loras
    clip_dir = _tiny_clip_dir(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na photo of a cat\n\na watercolor of a lighthouse\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = ev.evaluate(tmp_path / "out", methods=[f"rf={reflow_file}:steps=1,2"], model=model, prompts=str(prompts),
                        grid_prompts=2, verbose=False, clip_model=clip_dir)
    assert r["prompts"]["toy"] is False and r["prompts"]["count"] == 2
    m = r["methods"]["rf"]
    assert (m["sampler"], m["num_windows"]) == ("perflow", 2)
    one, two = m["cells"]["1"], m["cells"]["2"]
    assert one["prompt_accuracy"] is None and "toy-world" in one["unavailable"]["prompt_accuracy"]
    assert one["toy_fid"] is None
    for cell in (one, two):  # --clip-model given: a number, not "unavailable"
        assert isinstance(cell["clip_score"], float) and 0.0 <= cell["clip_score"] <= 100.0
        assert "clip_score" not in cell["unavailable"] and "fid" in cell["unavailable"]
    assert "reflow windows" in one["notes"][0] and "notes" not in two  # 1 step < K=2 windows is flagged
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.count("| rf | perflow (K=2) |") == 2
    assert (tmp_path / "out" / "quality_vs_steps.png").stat().st_size > 0


def test_evaluation_prompts_source_matches_world():
    prompts, source = ev.read_prompts("toy:5", seed=3)
    assert prompts == evaluation_prompts(5, seed=3) and source.startswith("toy:5")
    assert ev.are_toy_prompts(prompts) and not ev.are_toy_prompts(prompts + ["a cat"])
