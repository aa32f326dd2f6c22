import json

import numpy as np
import pytest

from stepdistill.toy.scenes import (BACKGROUNDS, COLORS, POSITIONS, Scene, all_scenes, parse_caption, render,
                                    sample_scenes, write_image_folder)


def test_at_least_100_distinct_prompts_and_captions_parse_back():
    scenes = all_scenes()
    captions = {s.caption for s in scenes}
    assert len(captions) == len(scenes) >= 100
    for s in scenes:
        assert parse_caption(s.caption) == s


def test_sampling_is_deterministic_per_seed():
    a, sa = sample_scenes(16, seed=3)
    b, sb = sample_scenes(16, seed=3)
    c, _ = sample_scenes(16, seed=4)
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8


@pytest.mark.parametrize("scene", [s for s in all_scenes() if s.size == "large"][::7])
def test_image_agrees_with_caption(scene):
    img = render(scene).astype(float) / 255
    cx, cy = POSITIONS[scene.position]
    centre = img[int(cy * 32), int(cx * 32)]
    if scene.shape == "triangle":  # the centroid of the triangle lies below the box centre
        centre = img[int(cy * 32) + 3, int(cx * 32)]
    assert np.abs(centre - np.array(COLORS[scene.color])).max() < 0.02
    # the far corner from the shape is background
    corner = img[0, 31] if cx < 0.5 else img[31, 0]
    assert np.abs(corner - np.array(BACKGROUNDS[scene.background])).max() < 0.02


def test_render_at_other_resolutions():
    s = Scene("circle", "red", "white", "small", "center")
    assert render(s, resolution=64).shape == (64, 64, 3)


def test_parse_caption_rejects_non_toy_prompts():
    with pytest.raises(ValueError, match="shape"):
        parse_caption("a photo of a cat")


def test_image_folder_layout(tmp_path):
    write_image_folder(tmp_path, 5, seed=1)
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 5
    rows = [json.loads(l) for l in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    for png, row in zip(pngs, rows):
        assert png.with_suffix(".txt").read_text().strip() == row["text"]
        assert parse_caption(row["text"]).shape == row["shape"]
