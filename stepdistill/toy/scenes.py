"""Procedural captioned scenes: the embedded world's dataset (world v2).

A scene is one or two shapes (circle, square, triangle, cross) of one colour, of one size class, on a
textured background (plain, striped, checked or dotted, in white, black or gray, with a soft
lighting gradient). Geometry is continuous: each shape's centre and radius are drawn inside its
position region and size class, two shapes are placed anywhere they do not overlap, and stripe
angle, period and phase are free.

A caption always names the count, colour and shape ("a red circle", "two blue squares") and names
the other attributes only sometimes ("a small red circle on the left on a striped background"), so
a prompt leaves most of the image open: the conditional distribution has many modes, as with real
text-to-image data. ``parse_caption`` reads a caption back into the attributes it names;
``scene_for_caption`` draws a scene with those attributes and the rest free, which is how reference
sets for conditional metrics are made.

Everything here is plain numpy/PIL: no torch, so it is cheap to import and to test.
"""
from __future__ import annotations

import json
import math
import multiprocessing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

RESOLUTION = 64
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS = {  # shape colours, RGB in [0, 1]
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "magenta": (0.90, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
BACKGROUNDS = {  # (base colour, pattern colour) of each background, grey levels in [0, 1]
    "white": (0.93, 0.70),
    "black": (0.07, 0.32),
    "gray": (0.50, 0.30),
}
TEXTURES = ("plain", "striped", "checked", "dotted")
COUNTS = ("one", "two")
SIZES = {"small": (0.11, 0.15), "large": (0.19, 0.25)}  # half-extent range, as a fraction of the image side
POSITIONS = {  # region of a single shape's centre: (x range, y range) as fractions of the image side
    "center": ((0.42, 0.58), (0.42, 0.58)),
    "left": ((0.25, 0.36), (0.32, 0.68)),
    "right": ((0.64, 0.75), (0.32, 0.68)),
    "top": ((0.32, 0.68), (0.25, 0.36)),
    "bottom": ((0.32, 0.68), (0.64, 0.75)),
}
POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
ATTRIBUTES = {  # what the toy classifier reads back, in this order
    "shape": SHAPES,
    "color": tuple(COLORS),
    "count": COUNTS,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),  # of a single shape; undefined (None) for two
    "background": tuple(BACKGROUNDS),
    "texture": TEXTURES,
}
ALWAYS_NAMED = ("shape", "color", "count")
SOMETIMES_NAMED = ("size", "position", "background", "texture")
NAME_PROBABILITY = 0.5  # chance a caption names each sometimes-named attribute


@dataclass(frozen=True)
class Scene:
    """A full scene: every attribute, plus the continuous geometry and texture parameters."""
    shape: str
    color: str
    count: str
    size: str
    position: str | None
    background: str
    texture: str
    shapes: tuple = ()           # ((cx, cy, r), ...) per shape
    texture_params: tuple = ()   # (angle, period, phase_x, phase_y, gradient_angle, gradient_amount)
    color_jitter: tuple = (0.0, 0.0, 0.0)
    named: tuple = field(default=ALWAYS_NAMED)  # attributes the caption names

    @property
    def caption(self) -> str:
        return caption_of({k: getattr(self, k) for k in self.named})

    def labels(self) -> dict[str, int]:
        """Class index of each attribute (``-1`` for the position of two shapes)."""
        return {k: (-1 if getattr(self, k) is None else ATTRIBUTES[k].index(getattr(self, k))) for k in ATTRIBUTES}


def caption_of(spec: dict) -> str:
    """The caption naming exactly the attributes in ``spec`` (shape, colour and count are required)."""
    words = ["two" if spec["count"] == "two" else "a"]
    if spec.get("size"):
        words.append(spec["size"])
    words.append(spec["color"])
    words.append(PLURALS[spec["shape"]] if spec["count"] == "two" else spec["shape"])
    if spec.get("position") and spec["count"] == "one":
        words.append(POSITION_PHRASES[spec["position"]])
    bg = [spec[k] for k in ("background", "texture") if spec.get(k)]
    if bg:
        words.append(f"on a {' '.join(bg)} background")
    return " ".join(words)


def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of ``caption_of``: the attributes a caption names. Raises ``ValueError`` naming the caption
    when it is not a toy prompt."""
    text = caption.lower().replace(",", " ")
    words = text.split()
    spec: dict[str, str] = {}
    shapes = [s for s in SHAPES if s in words or PLURALS[s] in words]
    colors = [c for c in COLORS if c in words]
    if len(shapes) != 1:
        raise ValueError(f"caption {caption!r} must name exactly one shape from {list(SHAPES)}")
    if len(colors) != 1:
        raise ValueError(f"caption {caption!r} must name exactly one colour from {list(COLORS)}")
    spec["shape"], spec["color"] = shapes[0], colors[0]
    spec["count"] = "two" if PLURALS[shapes[0]] in words else "one"
    sizes = [s for s in SIZES if s in words]
    if len(sizes) > 1:
        raise ValueError(f"caption {caption!r} names more than one size")
    if sizes:
        spec["size"] = sizes[0]
    positions = [p for p, phrase in POSITION_PHRASES.items() if phrase in text]
    if len(positions) > 1 or (positions and spec["count"] == "two"):
        raise ValueError(f"caption {caption!r}: a position is named once, and only for one shape")
    if positions:
        spec["position"] = positions[0]
    if "background" in words:
        tail = text.split(" on a ", 1)[-1]
        for key, values in (("background", BACKGROUNDS), ("texture", TEXTURES)):
            hits = [v for v in values if v in tail.split()]
            if hits:
                spec[key] = hits[0]
    return spec


def _draw_single_centre(rng, position):
    (x0, x1), (y0, y1) = POSITIONS[position]
    return rng.uniform(x0, x1), rng.uniform(y0, y1)


def scene_for_caption(caption_or_spec, rng: np.random.Generator, named: tuple | None = None) -> Scene:
    """A scene with the attributes a caption (or spec dict) names and every other attribute drawn at random."""
    spec = parse_caption(caption_or_spec) if isinstance(caption_or_spec, str) else dict(caption_or_spec)
    shape = spec.get("shape") or SHAPES[rng.integers(len(SHAPES))]
    color = spec.get("color") or tuple(COLORS)[rng.integers(len(COLORS))]
    count = spec.get("count") or COUNTS[rng.integers(2)]
    size = spec.get("size") or tuple(SIZES)[rng.integers(2)]
    background = spec.get("background") or tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    texture = spec.get("texture") or TEXTURES[rng.integers(len(TEXTURES))]
    r_lo, r_hi = SIZES[size]
    if count == "one":
        position = spec.get("position") or tuple(POSITIONS)[rng.integers(len(POSITIONS))]
        cx, cy = _draw_single_centre(rng, position)
        shapes = ((cx, cy, rng.uniform(r_lo, r_hi)),)
    else:
        position = None
        shapes = []
        rs = rng.uniform(r_lo, r_hi, 2) * 0.85  # two shapes of a size class are drawn a little smaller
        for _ in range(256):  # anywhere inside the frame, not overlapping
            cs = [(rng.uniform(r + 0.03, 0.97 - r), rng.uniform(r + 0.03, 0.97 - r)) for r in rs]
            if math.dist(cs[0], cs[1]) >= 1.15 * (rs[0] + rs[1]):
                break
        shapes = tuple((c[0], c[1], r) for c, r in zip(cs, rs))
    texture_params = (rng.uniform(0, math.pi), rng.uniform(0.22, 0.32), rng.uniform(0, 1), rng.uniform(0, 1),
                      rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.12))
    jitter = tuple(rng.uniform(-0.04, 0.04, 3))
    if named is None:
        named = tuple(k for k in ATTRIBUTES if k in spec)
    return Scene(shape, color, count, size, position, background, texture, shapes, texture_params, jitter, named)


def random_caption(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` with a fresh draw of what its caption names: each sometimes-named attribute with probability 1/2."""
    named = list(ALWAYS_NAMED)
    for key in SOMETIMES_NAMED:
        if rng.random() < NAME_PROBABILITY and getattr(scene, key) is not None:
            named.append(key)
    return Scene(**{**asdict(scene), "named": tuple(named)})


def random_scene(rng: np.random.Generator) -> Scene:
    """A scene from the world's prior, with a caption naming each sometimes-named attribute with probability 1/2."""
    return random_caption(scene_for_caption({}, rng, named=()), rng)


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = r * 0.85
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # upward, apex at top, base at bottom
        inside_y = (dy >= -r) & (dy <= r)
        half_width = (dy + r) / (2 * r) * r * 1.15
        return inside_y & (np.abs(dx) <= half_width)
    if shape == "cross":
        w = r * 0.36
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _texture(texture: str, xs, ys, params) -> np.ndarray:
    """Pattern coverage in [0, 1] (1 = pattern colour) of a background texture."""
    angle, period, px, py, _, _ = params
    if texture == "plain":
        return np.zeros_like(xs)
    if texture == "striped":
        u = (xs * math.cos(angle) + ys * math.sin(angle)) / period + px
        return (np.sin(2 * math.pi * u) > 0).astype(np.float32)
    u, v = xs / period + px, ys / period + py
    if texture == "checked":
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    if texture == "dotted":
        du, dv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
        return (du * du + dv * dv <= 0.22 ** 2).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def sample_grid(resolution: int, supersample: int):
    """Pixel-centre coordinates ``(xs, ys)`` in [0, 1] of a ``resolution * supersample`` square grid."""
    n = resolution * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    return np.meshgrid(coords, coords)


def background_grey(scene: Scene, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The background's grey level at each grid point: base colour, texture pattern and lighting gradient."""
    base, pattern = BACKGROUNDS[scene.background]
    grey = base + (pattern - base) * _texture(scene.texture, xs, ys, scene.texture_params)
    g_angle, g_amount = scene.texture_params[4], scene.texture_params[5]
    return grey + g_amount * ((xs - 0.5) * math.cos(g_angle) + (ys - 0.5) * math.sin(g_angle))


def shapes_mask(scene: Scene, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of the scene's shapes on the grid."""
    mask = np.zeros_like(xs, dtype=bool)
    for cx, cy, r in scene.shapes:
        mask |= _shape_mask(scene.shape, xs, ys, cx, cy, r)
    return mask


def shape_colour(scene: Scene) -> np.ndarray:
    return np.clip(np.array(COLORS[scene.color]) + np.array(scene.color_jitter), 0, 1)


def downsample(img: np.ndarray, resolution: int, supersample: int) -> np.ndarray:
    """Box-filter a supersampled ``(n, n, 3)`` float image to ``(resolution, resolution, 3)`` uint8."""
    img = img.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def render(scene: Scene, resolution: int = RESOLUTION, supersample: int = 2) -> np.ndarray:
    """Render a scene to an ``(H, W, 3)`` uint8 array (anti-aliased by supersampling)."""
    xs, ys = sample_grid(resolution, supersample)
    img = np.repeat(background_grey(scene, xs, ys)[..., None], 3, axis=-1)
    img = np.where(shapes_mask(scene, xs, ys)[..., None], shape_colour(scene), img)
    return downsample(img, resolution, supersample)


def _render_one(args):
    return render(*args)


def render_many(scenes: list[Scene], resolution: int = RESOLUTION, workers: int = 1) -> np.ndarray:
    """Render ``scenes`` to an ``(N, H, W, 3)`` uint8 array, in ``workers`` processes when more than one
    (rendering is a pure function of the scene, so the result does not depend on ``workers``)."""
    if not scenes:
        return np.zeros((0, resolution, resolution, 3), np.uint8)
    if workers <= 1 or len(scenes) < 256:
        return np.stack([render(s, resolution) for s in scenes])
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return np.stack(pool.map(_render_one, [(s, resolution) for s in scenes], chunksize=64))


def sample_scenes(n: int, seed: int, resolution: int = RESOLUTION, workers: int = 1) -> tuple[np.ndarray, list[Scene]]:
    """``n`` random scenes from ``seed``: a ``(n, H, W, 3)`` uint8 array and their scenes. Deterministic."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return render_many(scenes, resolution, workers), scenes


def reference_scenes(captions: list[str], per_caption: int, seed: int, resolution: int = RESOLUTION,
                     workers: int = 1) -> np.ndarray:
    """``per_caption`` renders of each caption (caption-major), the attributes it leaves open drawn at random:
    a sample of the conditional distribution behind a prompt set (the reference of conditional toy-FID)."""
    rng = np.random.default_rng(seed)
    scenes = [scene_for_caption(c, rng) for c in captions for _ in range(per_caption)]
    return render_many(scenes, resolution, workers)


def write_image_folder(directory: str | Path, n: int, seed: int, resolution: int = RESOLUTION) -> Path:
    """Write ``n`` scenes as ``NNNNNN.png`` + ``NNNNNN.txt`` captions (the layout users give their own data),
    plus a ``metadata.jsonl`` with the same captions (the HF imagefolder layout)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images, scenes = sample_scenes(n, seed, resolution)
    with open(directory / "metadata.jsonl", "w") as meta:
        for i, (img, scene) in enumerate(zip(images, scenes)):
            name = f"{i:06d}"
            Image.fromarray(img).save(directory / f"{name}.png")
            (directory / f"{name}.txt").write_text(scene.caption + "\n")
            row = {"file_name": f"{name}.png", "text": scene.caption,
                   **{k: getattr(scene, k) for k in ATTRIBUTES}}
            meta.write(json.dumps(row) + "\n")
    return directory


def vocabulary() -> list[str]:
    """Every word a toy caption can contain (the tokenizer learns one token per word)."""
    words = {"a", "two", "on", "background", "in", "the", "at"}
    words.update(SHAPES, PLURALS.values(), COLORS, SIZES, BACKGROUNDS, TEXTURES)
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)
