import json
import math

import numpy as np
import pytest

from stepdistill.toy.scenes import (ATTRIBUTES, BACKGROUNDS, COLORS, POSITIONS, SIZES, caption_of, parse_caption,
                                    random_scene, reference_scenes, render, sample_scenes, scene_for_caption,
                                    vocabulary, write_image_folder)
from stepdistill.toy.world import evaluation_prompts


def test_captions_parse_back_to_what_they_name():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(500)]
    for s in scenes:
        assert parse_caption(s.caption) == {k: getattr(s, k) for k in s.named}
        assert set(s.caption.split()) <= set(vocabulary())
    captions = {s.caption for s in scenes}
    assert len(captions) > 200  # the caption distribution is wide
    # captions leave attributes open: most name only some of the seven
    assert np.mean([len(s.named) < len(ATTRIBUTES) - 1 for s in scenes]) > 0.8


def test_sampling_is_deterministic_per_seed():
    a, sa = sample_scenes(16, seed=3)
    b, sb = sample_scenes(16, seed=3)
    c, _ = sample_scenes(16, seed=4)
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(sample_scenes(300, seed=5, workers=2)[0], sample_scenes(300, seed=5)[0])


def test_a_caption_leaves_many_modes_open():
    """One prompt, many images: positions, sizes and textures differ between draws."""
    rng = np.random.default_rng(1)
    draws = [scene_for_caption("a red circle", rng) for _ in range(200)]
    assert {d.position for d in draws} == set(POSITIONS)
    assert len({d.background for d in draws}) == len(BACKGROUNDS)
    images = reference_scenes(["a red circle"], 8, seed=0)
    assert len({img.tobytes() for img in images}) == 8
    # and what it names is held fixed
    assert all(d.shape == "circle" and d.color == "red" and d.count == "one" for d in draws)


@pytest.mark.parametrize("caption", ["a large red circle on the left on a white plain background",
                                     "a small blue square at the top on a black plain background",
                                     "a large yellow cross in the center on a gray plain background"])
def test_image_agrees_with_caption(caption):
    scene = scene_for_caption(caption, np.random.default_rng(2))
    (cx, cy, r), = scene.shapes
    (x0, x1), (y0, y1) = POSITIONS[scene.position]
    assert x0 <= cx <= x1 and y0 <= cy <= y1 and SIZES[scene.size][0] <= r <= SIZES[scene.size][1]
    img = render(scene).astype(float) / 255
    centre = img[int(cy * 64), int(cx * 64)]
    assert np.abs(centre - np.array(COLORS[scene.color])).max() < 0.06
    corner = img[1, 62] if cx < 0.5 else img[62, 1]  # far from the shape: background (plain, up to the gradient)
    assert abs(corner.mean() - BACKGROUNDS[scene.background][0]) < 0.1


def test_two_shapes_do_not_overlap():
    rng = np.random.default_rng(3)
    for _ in range(300):
        s = scene_for_caption({"count": "two", "size": "large"}, rng)
        (a, b, r0), (c, d, r1) = s.shapes
        assert math.dist((a, b), (c, d)) >= 1.15 * (r0 + r1)
        assert s.position is None and s.labels()["position"] == -1


def test_parse_caption_rejects_non_toy_prompts():
    with pytest.raises(ValueError, match="shape"):
        parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="position"):
        parse_caption("two red circles on the left")
    assert caption_of({"shape": "cross", "color": "cyan", "count": "two", "texture": "dotted"}) == \
        "two cyan crosses on a dotted background"


def test_evaluation_prompts_are_fixed_and_seeded():
    assert evaluation_prompts(50) == evaluation_prompts(50)
    assert evaluation_prompts(50, seed=1) != evaluation_prompts(50)
    for p in evaluation_prompts(50):
        parse_caption(p)


def test_image_folder_layout(tmp_path):
    write_image_folder(tmp_path, 5, seed=1)
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 5
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    for png, row in zip(pngs, rows):
        assert png.with_suffix(".txt").read_text().strip() == row["text"]
        assert parse_caption(row["text"])["shape"] == row["shape"]
