import numpy as np
import pytest
import torch

from stepdistill.eval import metrics
from stepdistill.toy.scenes import caption_of, parse_caption, reference_scenes, render, sample_scenes, scene_for_caption
from stepdistill.toy.world import evaluation_prompts


def test_classifier_reads_real_scenes():
    images, scenes = sample_scenes(500, seed=4242)
    out = metrics.prompt_accuracy(images, [s.caption for s in scenes])
    assert out["prompt_accuracy"] > 0.95
    for key in ("acc_shape", "acc_color", "acc_count", "acc_background", "acc_size", "acc_position", "acc_texture"):
        assert out[key] > 0.94, key
    assert out["real"] > 0.95


def test_noise_images_score_low():
    _, scenes = sample_scenes(300, seed=1)
    noise = np.random.default_rng(0).integers(0, 256, (300, 64, 64, 3), dtype=np.uint8)
    assert metrics.prompt_accuracy(noise, [s.caption for s in scenes])["prompt_accuracy"] < 0.1


def test_prompt_accuracy_checks_every_named_attribute():
    images, scenes = sample_scenes(200, seed=2)
    shuffled = [scenes[(i + 1) % len(scenes)].caption for i in range(len(scenes))]
    assert metrics.prompt_accuracy(images, shuffled)["prompt_accuracy"] < 0.2
    # the right shape and colour but a wrong position named: no longer a match
    moved = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left"}
    rng = np.random.default_rng(0)
    one = [s for s in (scene_for_caption({"count": "one"}, rng) for _ in range(100))]
    imgs = np.stack([render(s) for s in one])
    right = [caption_of({"shape": s.shape, "color": s.color, "count": "one", "position": s.position}) for s in one]
    wrong = [caption_of({"shape": s.shape, "color": s.color, "count": "one", "position": moved[s.position]})
             for s in one]
    assert metrics.prompt_accuracy(imgs, right)["prompt_accuracy"] > 0.9
    assert metrics.prompt_accuracy(imgs, wrong)["prompt_accuracy"] < 0.1


def test_blur_and_blends_are_seen_by_fid_precision_and_the_real_head():
    """What step distillation fixes is visible: averages of a prompt's modes (what a one-step sampler returns)
    score a far worse conditional toy-FID and precision than real draws of the same prompts."""
    prompts = evaluation_prompts(200, seed=3)
    real = reference_scenes(prompts, 1, seed=11)
    blends = np.stack([reference_scenes([p], 4, seed=100 + i).astype(np.float32).mean(0).round().astype(np.uint8)
                       for i, p in enumerate(prompts)])
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    good, bad, worst = (metrics.toy_metrics(x, prompts) for x in (real, blends, noise))
    assert good["toy_fid"] < 0.25 * bad["toy_fid"] and good["toy_fid"] < 0.25 * worst["toy_fid"]
    assert good["precision"] > 0.8 > 0.3 > bad["precision"]
    assert good["real"] > 0.9 > 0.2 > bad["real"]


def test_recall_sees_mode_collapse():
    """Every prompt drawn in one mode (what it leaves open fixed: large, centred, white plain background):
    the images are still real scenes (precision stays), but they cover little of the distribution (recall drops)."""
    prompts = evaluation_prompts(200, seed=4)
    real = reference_scenes(prompts, 1, seed=12)
    mode = {"size": "large", "position": "center", "background": "white", "texture": "plain"}

    def collapse(p):
        spec = {**mode, **parse_caption(p)}
        if spec["count"] == "two":
            del spec["position"]
        return render(scene_for_caption(spec, np.random.default_rng(0)))

    collapsed = np.stack([collapse(p) for p in prompts])
    good, col = metrics.toy_metrics(real, prompts), metrics.toy_metrics(collapsed, prompts)
    assert col["recall"] < good["recall"] - 0.1
    assert col["precision"] > 0.5


def test_precision_recall_on_known_sets():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (300, 4))
    assert metrics.precision_recall(ref + 0.0, ref)[0] == 1.0
    far = rng.normal(10, 1, (300, 4))
    assert metrics.precision_recall(far, ref) == (0.0, 0.0)


def test_frechet_distance_matches_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20000, 3))
    b = rng.normal(1, 2, (20000, 3))
    # mu diff^2 = 3; traces: 3 + 12 - 2 * 3 * sqrt(1 * 4) = 3  -> total 6
    assert metrics.frechet_distance(a, b) == pytest.approx(6.0, abs=0.15)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_real_metrics_say_what_is_missing(tmp_path):
    images, scenes = sample_scenes(4, seed=0)
    with pytest.raises(metrics.MetricUnavailable, match="CLIP score needs a local CLIP model"):
        metrics.clip_score(images, [s.caption for s in scenes], tmp_path / "nope")
    with pytest.raises(metrics.MetricUnavailable, match="Inception"):
        metrics.inception_fid(images, images, weights_path=tmp_path / "missing.pth")


def test_clip_score_with_a_local_clip_model(tmp_path):
    """The real CLIP-score path, on a tiny randomly initialised CLIP model saved locally."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from stepdistill.toy.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                    crop_size={"height": 32, "width": 32}),
                              tokenizer=tok)
    processor.save_pretrained(tmp_path)
    images, scenes = sample_scenes(6, seed=0)
    score = metrics.clip_score(images, [s.caption for s in scenes], tmp_path)
    assert 0.0 <= score <= 100.0
    assert score == metrics.clip_score(images, [s.caption for s in scenes], tmp_path)
