"""Loading a teacher: ``"toy"`` (the embedded world), a local diffusers pipeline directory, or a hub id; or only
its denoiser (UNet or transformer), without the text encoders or the VAE -- what checking a LoRA against its base
model needs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline

from ..errors import ModelError
from ..toy.world import toy_teacher_path


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model_path(model: str) -> str:
    """``"toy"`` -> the embedded teacher's directory; anything else is returned as given."""
    return toy_teacher_path() if model == "toy" else model


def load_pipeline(model: str = "toy", device: str | None = None, dtype: torch.dtype | None = None):
    """``model``: ``"toy"`` (the embedded teacher), a local pipeline directory, or a hub id (on machines that
    reach the hub). Returns a diffusers pipeline on ``device`` (CUDA when available)."""
    device = device or default_device()
    path = resolve_model_path(model)
    if Path(path).exists() and not (Path(path) / "model_index.json").exists():
        raise ModelError(f"{path} is not a diffusers pipeline directory (no model_index.json); pass a "
                         "directory saved with `pipe.save_pretrained`, a hub id, or 'toy'")
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    kwargs = {"torch_dtype": dtype}
    if model == "toy":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_component(model: str):
    """The UNet or transformer of a pipeline directory (or ``"toy"``), loaded alone, float32 on the CPU."""
    root = Path(resolve_model_path(model))
    index = root / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{root} is not a diffusers pipeline directory (no model_index.json)")
    entries = json.loads(index.read_text())
    for name in ("unet", "transformer"):
        if name in entries and isinstance(entries[name], list) and entries[name][1]:
            cls = getattr(diffusers, entries[name][1])
            return cls.from_pretrained(str(root), subfolder=name, torch_dtype=torch.float32)
    raise ModelError(f"{root} has neither a unet nor a transformer component")


def resolve_component(base_model):
    """The denoiser a ``base_model`` argument names: None stays None, a model is returned as is, a pipeline gives
    its ``unet`` or ``transformer`` (None if it has neither), a path or ``"toy"`` is loaded (:func:`load_component`)."""
    if base_model is None or isinstance(base_model, torch.nn.Module):
        return base_model
    if not isinstance(base_model, (str, os.PathLike)):
        return getattr(base_model, "unet", None) or getattr(base_model, "transformer", None)
    return load_component(str(base_model))
