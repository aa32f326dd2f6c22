"""Procedural captioned scenes: the embedded world's dataset.

Each scene is one shape (circle, square, triangle, cross) of one colour on a plain background, with a
size and a position. The caption names all five attributes, so it fully describes the image, e.g.
``"a large red circle on the left on a gray background"``. Scenes are deterministic functions of a
seed and render at any resolution (32x32 by default) with 4x supersampled anti-aliasing.

Everything here is plain numpy/PIL: no torch, so it is cheap to import and to test.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {  # shape colours, RGB in [0, 1]
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "magenta": (0.90, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
BACKGROUNDS = {
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
}
SIZES = {"small": 0.19, "large": 0.31}  # half-extent of the shape, as a fraction of the image side
POSITIONS = {  # centre of the shape, (x, y) as fractions of the image side
    "center": (0.5, 0.5),
    "left": (0.31, 0.5),
    "right": (0.69, 0.5),
    "top": (0.5, 0.31),
    "bottom": (0.5, 0.69),
}
POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
ATTRIBUTES = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "background": tuple(BACKGROUNDS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return (f"a {self.size} {self.color} {self.shape} {POSITION_PHRASES[self.position]} "
                f"on a {self.background} background")

    def labels(self) -> dict[str, int]:
        """Class index of each attribute, in ``ATTRIBUTES`` order."""
        return {k: ATTRIBUTES[k].index(getattr(self, k)) for k in ATTRIBUTES}


def all_scenes() -> list[Scene]:
    """Every distinct scene (= every distinct prompt): 4 shapes x 6 colours x 3 backgrounds x 2 sizes x 5 positions."""
    return [Scene(*combo) for combo in itertools.product(*ATTRIBUTES.values())]


def parse_caption(caption: str) -> Scene:
    """Inverse of ``Scene.caption``; raises ``ValueError`` naming the caption when it is not a toy prompt."""
    words = caption.lower().replace(",", " ").split()
    found = {}
    for key, values in (("shape", SHAPES), ("color", COLORS), ("size", SIZES)):
        hits = [v for v in values if v in words]
        if len(hits) != 1:
            raise ValueError(f"caption {caption!r} must name exactly one {key} from {list(values)}")
        found[key] = hits[0]
    bg = [b for b in BACKGROUNDS if f"{b} background" in caption.lower()]
    if len(bg) != 1:
        raise ValueError(f"caption {caption!r} must name one '<colour> background' from {list(BACKGROUNDS)}")
    pos = [p for p, phrase in POSITION_PHRASES.items() if phrase in caption.lower()]
    if len(pos) != 1:
        raise ValueError(f"caption {caption!r} must name one position from {list(POSITION_PHRASES.values())}")
    return Scene(found["shape"], found["color"], bg[0], found["size"], pos[0])


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(*(values[rng.integers(len(values))] for values in ATTRIBUTES.values()))


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = r * 0.85
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # upward, apex at top, base at bottom
        h = r * 1.0
        inside_y = (dy >= -h) & (dy <= h)
        half_width = (dy + h) / (2 * h) * r * 1.1
        return inside_y & (np.abs(dx) <= half_width)
    if shape == "cross":
        w = r * 0.36
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, resolution: int = 32, rng: np.random.Generator | None = None,
           supersample: int = 4) -> np.ndarray:
    """Render a scene to an ``(H, W, 3)`` uint8 array.

    With ``rng`` the scene gets small jitter (position +-4%, size +-8%, colours +-0.04) so a prompt
    stands for a distribution of images rather than one image; without it the rendering is canonical.
    """
    n = resolution * supersample
    coords = (np.arange(n) + 0.5) / n
    xs, ys = np.meshgrid(coords, coords)
    cx, cy = POSITIONS[scene.position]
    r = SIZES[scene.size]
    fg = np.array(COLORS[scene.color])
    bg = np.array(BACKGROUNDS[scene.background])
    if rng is not None:
        cx += rng.uniform(-0.04, 0.04)
        cy += rng.uniform(-0.04, 0.04)
        r *= rng.uniform(0.92, 1.08)
        fg = np.clip(fg + rng.uniform(-0.04, 0.04, 3), 0, 1)
        bg = np.clip(bg + rng.uniform(-0.04, 0.04, 3), 0, 1)
    mask = _shape_mask(scene.shape, xs, ys, cx, cy, r).astype(np.float32)
    mask = mask.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))[..., None]
    img = mask * fg + (1 - mask) * bg
    return np.round(img * 255).clip(0, 255).astype(np.uint8)


def sample_scenes(n: int, seed: int, resolution: int = 32) -> tuple[np.ndarray, list[Scene]]:
    """``n`` random scenes from ``seed``: a ``(n, H, W, 3)`` uint8 array and their scenes. Deterministic."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(s, resolution, rng) for s in scenes])
    return images, scenes


def write_image_folder(directory: str | Path, n: int, seed: int, resolution: int = 32) -> Path:
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
            meta.write(json.dumps({"file_name": f"{name}.png", "text": scene.caption, **asdict(scene)}) + "\n")
    return directory
