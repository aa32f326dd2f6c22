import numpy as np
import pytest
import torch

from stepdistill.eval import metrics
from stepdistill.toy.scenes import sample_scenes


def test_classifier_reads_real_scenes():
    images, scenes = sample_scenes(500, seed=4242)
    out = metrics.prompt_accuracy(images, [s.caption for s in scenes])
    assert out["prompt_accuracy"] > 0.97
    for key in ("acc_shape", "acc_color", "acc_background", "acc_size", "acc_position"):
        assert out[key] > 0.95, key


def test_noise_images_score_low():
    _, scenes = sample_scenes(300, seed=1)
    noise = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    assert metrics.prompt_accuracy(noise, [s.caption for s in scenes])["prompt_accuracy"] < 0.1


def test_prompt_accuracy_detects_wrong_prompts():
    images, scenes = sample_scenes(200, seed=2)
    shuffled = [scenes[(i + 1) % len(scenes)].caption for i in range(len(scenes))]
    assert metrics.prompt_accuracy(images, shuffled)["prompt_accuracy"] < 0.2


def test_toy_fid_separates_real_from_fake():
    real, _ = sample_scenes(600, seed=99)
    noise = np.random.default_rng(0).integers(0, 256, (600, 32, 32, 3), dtype=np.uint8)
    blurred = np.repeat(np.repeat(real[:, ::4, ::4], 4, axis=1), 4, axis=2)  # 8x8 blocks
    fid_real, fid_blur, fid_noise = metrics.toy_fid(real), metrics.toy_fid(blurred), metrics.toy_fid(noise)
    assert fid_real < fid_blur < fid_noise
    assert fid_real < 0.1 * fid_noise


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
