"""The embedded world: where the committed toy teacher lives and how to load it like any SD 1.5 model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .scenes import random_scene

TOY_TEACHER_DIR = Path(__file__).parent / "weights" / "teacher"
TOY_RECIPES_DIR = Path(__file__).parent / "recipes"  # the toy YAML recipes (configs/toy-*.yaml link here)
# Sampler settings the toy teacher was evaluated with (measured in RESULTS: see README).
TOY_GUIDANCE = 2.0
TOY_TEACHER_STEPS = 50


def toy_teacher_path() -> str:
    if not (TOY_TEACHER_DIR / "model_index.json").exists():
        raise FileNotFoundError(
            f"the toy teacher is missing from {TOY_TEACHER_DIR}; reinstall stepdistill, or retrain it with "
            f"`python train/train_toy_teacher.py --out {TOY_TEACHER_DIR}`")
    return str(TOY_TEACHER_DIR)


def toy_recipe(name: str) -> Path:
    """The packaged toy recipe ``name`` (``lcm-lora``, ``reflow``, ``reflow-onestep``)."""
    path = TOY_RECIPES_DIR / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no toy recipe {name!r}; available: {sorted(p.stem for p in TOY_RECIPES_DIR.glob('*.yaml'))}")
    return path


def evaluation_prompts(n: int, seed: int = 0) -> list[str]:
    """A fixed, seeded set of ``n`` toy prompts drawn from the world's caption distribution (each names count,
    colour and shape, and each other attribute with probability 1/2), for evaluation."""
    rng = np.random.default_rng(10_000 + seed)
    return [random_scene(rng).caption for _ in range(n)]
