"""Style LoRA + acceleration LoRA stacking: the style renders and the style-strength proxy, adapter weights in a
stack, and (with the committed toy teacher and adapters) that a 4-step accelerated sample keeps the style."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from stepdistill import lora
from stepdistill.experiments import stacking, style
from stepdistill.toy import scenes as S
from stepdistill.toy.world import TOY_GUIDANCE


# ----------------------------------------------------------------------------------------------- style renders


def test_unstyled_render_is_exactly_scenes_render():
    b, sa = style.sample_styled_scenes(64, 11, style="none")
    a = np.stack([S.render(s) for s in sa])
    assert np.array_equal(a, b) and all(s.texture == "plain" and s.count == "one" for s in sa)
    for name in ("hollow", "outline"):
        c, sc = style.sample_styled_scenes(64, 11, style=name)
        assert sc == sa and not np.array_equal(a, c)
        # only pixels near/inside the shape change: most of the background is untouched
        same = np.abs(a.astype(int) - c.astype(int)).max(-1) == 0
        assert 0.6 < same.mean() < 0.99, name


def test_fine_tune_data_is_the_whole_world_with_the_shift():
    """The transfer experiment's fine-tunes train on every kind of scene (two shapes, textures) with the shift
    applied; the style measures keep their one-shape plain-background scenes. (Fine-tunes on the latter alone
    forgot the rest of world v2: toy-FID 669 -> 2719 at 50 steps on the evaluation prompts.)"""
    large = stacking.SHIFTS["large"][0]
    _, world = style.sample_styled_scenes(200, 3, style="none", where=large, only_styleable=False)
    assert all(large(s) for s in world)
    assert sum(not style.styleable(s) for s in world) > 100  # most world scenes have two shapes or a texture
    _, measured = style.sample_styled_scenes(200, 3, style="none", where=large)
    assert all(style.styleable(s) and large(s) for s in measured)


def test_hollow_strength_separates_styled_from_unstyled_renders():
    plain, scenes = style.sample_styled_scenes(300, 5, style="none")
    styled, _ = style.sample_styled_scenes(300, 5, style="hollow")
    s_plain, s_styled = style.style_strength_per_image(plain), style.style_strength_per_image(styled)
    assert s_plain.mean() < 0.1 and s_styled.mean() > 0.7
    shapes = np.array([s.shape for s in scenes])
    for shape in ("circle", "square"):  # hollow centres read as background, solid ones as the shape colour
        m = shapes == shape
        assert s_styled[m].mean() > 0.9 and s_plain[m].mean() < 0.1, shape
    for bg in S.BACKGROUNDS:
        m = np.array([s.background == bg for s in scenes])
        assert s_styled[m].mean() > 0.6 and s_plain[m].mean() < 0.1, bg
    blank = np.full((1, 64, 64, 3), 240, np.uint8)  # nothing drawn -> 0
    assert style.style_strength(blank) == 0.0


def test_outline_strength_separates_styled_from_unstyled_renders():
    plain, scenes = style.sample_styled_scenes(300, 5, style="none")
    styled, _ = style.sample_styled_scenes(300, 5, style="outline")
    s_plain = style.style_strength_per_image(plain, "outline")
    s_styled = style.style_strength_per_image(styled, "outline")
    assert s_plain.mean() < 0.02 and s_styled.mean() > 0.75
    for bg in S.BACKGROUNDS:  # the ink flips to white on black: every background is measured
        m = np.array([s.background == bg for s in scenes])
        assert s_styled[m].mean() > 0.7, bg


def test_the_style_keeps_the_scene_readable():
    """The classifier that scores prompt accuracy still reads colour and background of styled scenes and most
    of the rest (a hollow shape's count and size are its hardest cases), so accuracy stays a second axis."""
    from stepdistill.eval import metrics

    styled, scenes = style.sample_styled_scenes(300, 7, style="hollow")
    acc = metrics.prompt_accuracy(styled, [s.caption for s in scenes])
    assert acc["prompt_accuracy"] > 0.5 and acc["acc_color"] > 0.95 and acc["acc_background"] > 0.95


# ----------------------------------------------------------------------------------------------- stacking mechanics


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random SD-shaped pipeline saved as a directory (what train_style_lora / load_pipeline take)."""
    from stepdistill.toy.teacher import build_random_pipeline

    pipe = build_random_pipeline(seed=0)
    d = tmp_path_factory.mktemp("tiny") / "pipe"
    pipe.save_pretrained(str(d))
    return str(d)


def test_train_style_lora_writes_a_loadable_style_adapter(tiny_dir, tmp_path):
    from stepdistill.models.pipeline import load_pipeline

    recipe = style.StyleRecipe(n_images=64, steps=6, batch_size=4, rank=4, learning_rate=1e-2)
    path = style.train_style_lora(tiny_dir, tmp_path / "style", recipe, log_every=0)
    sd, md, fmt = lora.read_lora(path)
    assert fmt == "kohya" and md["stepdistill.method"] == "style" and md["stepdistill.style"] == "hollow"
    layers = lora.read_lora_layers(path)
    assert len(layers) == 115 and max(u.abs().max().item() for _, u, _ in layers.values()) > 0  # it trained
    pipe = load_pipeline(tiny_dir, device="cpu")
    info = stacking.load_stack(pipe, {"style": path})  # stock load + layer-by-layer check
    assert info["style"]["method"] == "style"


def _unet_out(pipe):
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([900, 300]), ctx).sample


def test_stack_weights_zero_is_exactly_off_and_weights_add(tiny_dir, tmp_path):
    from stepdistill.models.pipeline import load_pipeline

    files = {}
    for i, name in enumerate(("accel", "style")):
        p = load_pipeline(tiny_dir, device="cpu")
        lora.add_lora_to_unet(p.unet, 4)
        g = torch.Generator().manual_seed(10 + i)
        for m in p.unet.modules():
            if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):
                m.lora_B["default"].weight.data.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g) * .05)
        files[name] = lora.save_lora(tmp_path / name, p.unet, dtype=torch.float32)
    base = _unet_out(load_pipeline(tiny_dir, device="cpu"))
    pipe = load_pipeline(tiny_dir, device="cpu")
    stacking.load_stack(pipe, files)
    names = ["accel", "style"]
    stacking.set_stack_weights(pipe, names, {})
    assert torch.equal(_unet_out(pipe), base)
    stacking.set_stack_weights(pipe, names, {"accel": 1.0})
    only_accel = _unet_out(pipe)
    stacking.set_stack_weights(pipe, names, {"style": 1.0})
    only_style = _unet_out(pipe)
    stacking.set_stack_weights(pipe, names, {"accel": 1.0, "style": 1.0})
    both = _unet_out(pipe)
    assert (only_accel - base).abs().max() > 1e-2 and (only_style - base).abs().max() > 1e-2
    assert (both - only_accel).abs().max() > 1e-2 and (both - only_style).abs().max() > 1e-2
    stacking.set_stack_weights(pipe, names, {"accel": 0.5})
    half = _unet_out(pipe)
    assert 0.2 < ((half - base).norm() / (only_accel - base).norm()).item() < 0.8


def test_recommend_maximises_the_weaker_retention():
    def cell(label, a, w, s, acc):
        return {"label": label, "weights": {k: v for k, v in (("accel", a), ("style", w)) if v},
                "style_strength": s, "prompt_accuracy": acc}

    results = [cell("style 1", 0, 1, 0.6, 0.8), cell("x", 1, 0.5, 0.3, 0.8), cell("y", 1, 1, 0.55, 0.7),
               cell("z", 1, 1.25, 0.7, 0.4), cell("accel 1", 1, 0, 0.0, 0.9)]
    best = stacking.recommend(results, "style 1")
    assert best["label"] == "y" and best["style_weight"] == 1 and best["accel_weight"] == 1
    assert best["score"] == pytest.approx(0.7 / 0.8)


# ----------------------------------------------------------------------------------------------- the guard


def _adapter(env: str, default: Path) -> Path | None:
    p = Path(os.environ.get(env, default))
    p = p / lora.LORA_WEIGHT_NAME if p.is_dir() else p
    return p if p.is_file() else None


@pytest.fixture(scope="module")
def toy_style_lora():
    """The committed hollow-style LoRA (``stepdistill/toy/weights/style-hollow``, made by ``stepdistill train-style
    --style hollow --steps 400``: docs/world.md), or the file ``STEPDISTILL_STYLE_LORA`` names. Its training code
    runs end to end in test_train_style_lora_writes_a_loadable_style_adapter (a tiny pipeline) and in the docs'
    smoke run of that command on the toy teacher."""
    found = _adapter("STEPDISTILL_STYLE_LORA", stacking.TOY_STYLE_LORA.parent)
    assert found is not None, f"no style LoRA in {stacking.TOY_STYLE_LORA.parent}: docs/world.md says how it is made"
    return found


@pytest.fixture(scope="module")
def toy_accel_lora():
    """The committed toy LCM-LoRA (``stepdistill/toy/weights/lcm-lora``, made by ``stepdistill distill --config
    configs/toy-lcm-lora.yaml``), or the file ``STEPDISTILL_ACCEL_LORA`` names."""
    found = _adapter("STEPDISTILL_ACCEL_LORA", stacking.TOY_ACCEL_LORA.parent)
    assert found is not None, f"no LCM-LoRA in {stacking.TOY_ACCEL_LORA.parent}: docs/world.md says how it is made"
    return found


@pytest.mark.parametrize("which,method,steps", [("style", "style", 400), ("accel", "lcd", 400)])
def test_committed_toy_adapters_say_what_made_them(which, method, steps, toy_style_lora, toy_accel_lora):
    """The committed adapters are kohya files for the toy teacher whose metadata names the method and the training
    steps of the command docs/world.md gives for them."""
    path = {"style": toy_style_lora, "accel": toy_accel_lora}[which]
    if os.environ.get("STEPDISTILL_STYLE_LORA" if which == "style" else "STEPDISTILL_ACCEL_LORA"):
        pytest.skip("checks the committed file, not one given through the environment")
    _, md, fmt = lora.read_lora(path)
    assert fmt == "kohya" and md["stepdistill.method"] == method and md["stepdistill.base_model"] == "toy"
    assert int(md["stepdistill.train_steps"]) == steps, md


GUARD_PROMPTS = 32


def test_style_lora_puts_the_style_on_the_teacher(toy_style_lora):
    """Guided DDIM with the style LoRA: hollow shapes, measurably, while the prompt is still followed."""
    from stepdistill.models.pipeline import load_pipeline

    pipe = load_pipeline("toy", device="cpu")
    stacking.load_stack(pipe, {"style": toy_style_lora})
    prompts = style.style_prompts(GUARD_PROMPTS, seed=1)
    g = TOY_GUIDANCE
    base, _ = stacking.evaluate_cell(pipe, ["style"], prompts, stacking.Cell("b", "ddim", 20, g, {}), fid=False)
    styled, _ = stacking.evaluate_cell(pipe, ["style"], prompts, stacking.Cell("s", "ddim", 20, g, {"style": 1.0}),
                                       fid=False)
    assert base["style_strength"] < 0.2
    # recorded (the committed 400-step LoRA, world v2): base 0.10, styled 0.42; colour 0.94, background 1.0
    assert styled["style_strength"] > max(base["style_strength"] + 0.1, 2 * base["style_strength"])
    assert styled["acc_color"] > 0.8 and styled["acc_background"] > 0.8  # what the teacher follows, still followed


def test_accelerated_stack_keeps_the_style_with_a_margin(toy_style_lora, toy_accel_lora):
    """4 LCM steps with accel + style LoRA keep the hollow style measurably; the accel LoRA alone draws solid
    shapes."""
    from stepdistill.models.pipeline import load_pipeline

    pipe = load_pipeline("toy", device="cpu")
    stacking.load_stack(pipe, {"accel": toy_accel_lora, "style": toy_style_lora})
    prompts = style.style_prompts(GUARD_PROMPTS, seed=1)
    names = ["accel", "style"]
    accel_only, _ = stacking.evaluate_cell(pipe, names, prompts, stacking.Cell("a", "lcm", 4, 1.0, {"accel": 1.0}),
                                           fid=False)
    both, _ = stacking.evaluate_cell(pipe, names, prompts,
                                     stacking.Cell("a+s", "lcm", 4, 1.0, {"accel": 1.0, "style": 1.0}), fid=False)
    assert accel_only["style_strength"] < 0.2
    assert both["style_strength"] > accel_only["style_strength"] + 0.15
    # recorded (the committed adapters, world v2; the LCM-LoRA of the cosine recipe, 2026-12-01): style strength
    # 0.185 alone, 0.344 stacked; colour 0.875 and background 1.0 stacked (the constant-rate adapter before it:
    # 0.115, 0.284, 0.91, 1.0). Whole-prompt accuracy is no guard here: the world v2 teacher reads shape and position
    # poorly (0.17 at 50 DDIM steps on these prompts) and a hollow shape's count and size are the judge's hardest
    # cases (0.09 alone, 0.06 stacked), so the guard is what the teacher follows, as in the test above.
    assert both["acc_color"] > 0.8 and both["acc_background"] > 0.8
