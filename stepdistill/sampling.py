"""Loading pipelines, choosing few-step samplers, sampling with fixed seeds, and image grids."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

STEP_NOISE_SEED_OFFSET = 10_000_019  # image i's between-step sampler noise uses seed + i + this offset

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(model: str = "toy", device: str | None = None, dtype: torch.dtype | None = None):
    """``model``: ``"toy"`` (the embedded teacher), a local pipeline directory, or a hub id (on machines that
    reach the hub). Returns a diffusers pipeline on ``device`` (CUDA when available)."""
    from diffusers import DiffusionPipeline

    from .toy.world import toy_teacher_path

    device = device or default_device()
    path = toy_teacher_path() if model == "toy" else model
    if Path(path).exists() and not (Path(path) / "model_index.json").exists():
        raise ValueError(f"{path} is not a diffusers pipeline directory (no model_index.json); pass a "
                         "directory saved with `pipe.save_pretrained`, a hub id, or 'toy'")
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    kwargs = {"torch_dtype": dtype}
    if model == "toy":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def set_scheduler(pipe, name: str, **overrides):
    """Swap the pipeline's scheduler for ``name`` (a key of ``SCHEDULERS``), keeping its noise schedule."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    config = dict(pipe.scheduler.config)
    if name == "ddim":  # set explicitly either way, so a previous trailing choice never leaks into this one
        config.update(timestep_spacing="trailing" if overrides.pop("trailing", False) else "leading")
    config.update(overrides)
    pipe.scheduler = cls.from_config(config)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int = 0, batch_size: int = 64,
             height: int | None = None, width: int | None = None, **pipe_kwargs):
    """Sample one image per prompt; image i uses ``torch.Generator().manual_seed(seed + i)`` for its noise,
    so results do not depend on the batch size. Returns (uint8 array (N,H,W,3), seconds per image)."""
    device = pipe.device
    images, elapsed = [], 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        latents = _initial_latents(pipe, len(chunk), seed + start, height, width)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # per-image generators also seed the noise that stochastic samplers (LCM, TCD) inject between steps
        generators = [torch.Generator().manual_seed(seed + start + i + STEP_NOISE_SEED_OFFSET) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, latents=latents, generator=generators,
                   output_type="np", height=height, width=width, **pipe_kwargs).images
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        images.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(images), elapsed / len(prompts)


def _initial_latents(pipe, n: int, seed: int, height: int | None, width: int | None) -> torch.Tensor:
    unet = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    scale = pipe.vae_scale_factor
    h = (height or unet.config.sample_size * scale) // scale
    w = (width or unet.config.sample_size * scale) // scale
    channels = unet.config.in_channels
    noise = [torch.randn((1, channels, h, w), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]
    return torch.cat(noise).to(pipe.device, unet.dtype)


def image_grid(rows: list[np.ndarray], row_labels: list[str] | None = None, col_labels: list[str] | None = None,
               scale: int = 2):
    """A labelled PIL grid: ``rows`` is a list of (N,H,W,3) uint8 arrays, one per row."""
    from PIL import Image, ImageDraw

    n_cols = max(len(r) for r in rows)
    h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    left = 8 + 7 * max((len(l) for l in row_labels), default=0) if row_labels else 0
    top = 14 if col_labels else 0
    grid = Image.new("RGB", (left + n_cols * (w + 2), top + len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = top + r * (h + 2)
        if row_labels:
            draw.text((4, y + h // 2 - 5), row_labels[r], fill="black")
        for c, img in enumerate(row):
            tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
            grid.paste(tile, (left + c * (w + 2), y))
    if col_labels:
        for c, label in enumerate(col_labels):
            draw.text((left + c * (w + 2) + 2, 1), label[: max(1, w // 6)], fill="black")
    return grid


def load_loras_into_pipeline(pipe, loras: list[tuple[str, float]], fuse: bool = False,
                             verify: bool = True) -> list[str]:
    """Load LoRA files (kohya or diffusers layout) as named adapters and activate them with their weights
    (``set_adapters``); with ``fuse`` fold them into the base weights. Each load is checked layer by layer
    against the file (a silently dropped layer raises). Returns the ``stepdistill.method`` of each file
    ("lcd", "reflow", or "" for foreign LoRAs)."""
    from . import lora_io

    names, weights, methods = [], [], []
    for i, (path, weight) in enumerate(loras):
        file = lora_io._resolve_file(path) if Path(path).is_dir() else Path(path)
        if not file.exists():
            raise FileNotFoundError(f"LoRA file {file} not found")
        _, metadata, _ = lora_io.read_lora(file)
        name = f"lora{i}_{file.parent.name if file.name == lora_io.LORA_WEIGHT_NAME else file.stem}"
        name = "".join(ch if ch.isalnum() else "_" for ch in name)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        if verify:
            lora_io.verify_lora_loaded(pipe, file, name)
        names.append(name)
        weights.append(weight)
        methods.append(metadata.get("stepdistill.method", ""))
    pipe.set_adapters(names, adapter_weights=weights)
    if fuse:
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    return methods
