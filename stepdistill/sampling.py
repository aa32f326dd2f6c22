"""Loading pipelines, choosing few-step samplers, sampling with fixed seeds, and image grids."""
from __future__ import annotations

import numbers
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image, ImageDraw

from . import lora
from .errors import ConfigError
from .flow_scheduler import PiecewiseRectifiedFlowScheduler
from .models.family import denoiser_of
from .models.latents import latent_shape, seeded_noise

DEFAULT_NUM_WINDOWS = 4  # PeRFlow windows when neither the caller nor the LoRA header says
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


def set_scheduler(pipe, name: str, **overrides):
    """Swap the pipeline's scheduler for ``name`` (a key of ``SCHEDULERS``), keeping its noise schedule."""
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SCHEDULERS))} (or perflow)")
    cls = getattr(diffusers, SCHEDULERS[name])
    config = dict(pipe.scheduler.config)
    if name == "ddim":  # set explicitly either way, so a previous trailing choice never leaks into this one
        config.update(timestep_spacing="trailing" if overrides.pop("trailing", False) else "leading")
    config.update(overrides)
    pipe.scheduler = cls.from_config(config)
    return pipe


def check_sampling_args(steps: int, guidance: float, steps_name: str = "steps", guidance_name: str = "guidance"):
    """``steps >= 1`` and ``guidance >= 0`` (diffusers runs classifier-free guidance only for a scale > 1: 0 to 1 all
    mean unguided sampling, and a negative scale would be reported but never applied)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ConfigError(f"{steps_name} must be an integer >= 1, got {steps!r}; e.g. {steps_name} 4")
    if not (guidance >= 0 and np.isfinite(guidance)):
        raise ConfigError(f"{guidance_name} must be >= 0 (a CFG scale; <= 1 means no classifier-free guidance), "
                          f"got {guidance}; e.g. {guidance_name} 1 for an acceleration LoRA, 5-7.5 for a base model")


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int = 0, batch_size: int = 64,
             height: int | None = None, width: int | None = None, **pipe_kwargs):
    """Sample one image per prompt; image i uses ``torch.Generator().manual_seed(seed + i)`` for its noise,
    so results do not depend on the batch size. Returns (uint8 array (N,H,W,3), seconds per image)."""
    check_sampling_args(steps, guidance)
    if not prompts:
        raise ConfigError("no prompts to sample; pass at least one prompt")
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
    return seeded_noise(range(n), seed, latent_shape(pipe, height, width)).to(pipe.device, denoiser_of(pipe).dtype)


def wrap_label(text: str, width: int) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` characters (a longer word is cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word[:width])
    return lines or [""]


def image_grid(rows: list[np.ndarray], row_labels: list[str] | None = None, col_labels: list[str] | None = None,
               scale: int = 2):
    """A labelled PIL grid: ``rows`` is a list of (N,H,W,3) uint8 arrays, one per row. Column labels are wrapped
    to the tile width, so a whole prompt stays readable above its column."""
    n_cols = max(len(r) for r in rows)
    h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    left = 8 + 7 * max((len(l) for l in row_labels), default=0) if row_labels else 0
    wrapped = [wrap_label(label, max(4, (w - 2) // 6)) for label in col_labels] if col_labels else []
    top = 2 + 11 * max((len(lines) for lines in wrapped), default=0) if col_labels else 0
    grid = Image.new("RGB", (left + n_cols * (w + 2), top + len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = top + r * (h + 2)
        if row_labels:
            draw.text((4, y + h // 2 - 5), row_labels[r], fill="black")
        for c, img in enumerate(row):
            tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
            grid.paste(tile, (left + c * (w + 2), y))
    for c, lines in enumerate(wrapped):
        for i, line in enumerate(lines):
            draw.text((left + c * (w + 2) + 2, 1 + 11 * i), line, fill="black")
    return grid


def load_lora_adapter(pipe, path: str | Path, adapter_name: str, verify: bool = True) -> tuple[dict[str, str], str]:
    """Load one LoRA file (or the weights file in a directory) as ``adapter_name`` with stock
    ``pipe.load_lora_weights``; with ``verify``, check layer by layer that it arrived intact (a dropped layer
    raises). Returns the file's ``(metadata, format)``."""
    file = lora_file(path)
    _, metadata, fmt = lora.read_lora(file)
    check_lora_fits(pipe, file)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)
    if verify:
        lora.verify_lora_loaded(pipe, file, adapter_name)
    return metadata, fmt


def check_lora_fits(pipe, file: Path):
    """Before loading: every layer of the LoRA ``file`` must name a module of the pipeline's denoiser with a fitting
    shape -- :class:`~stepdistill.lora.LoraFormatError` with the one line ``stepdistill inspect --base`` gives,
    instead of diffusers' size-mismatch dump."""
    try:
        lora.read_adapter(file, denoiser_of(pipe))
    except lora.LoraFormatError as e:
        raise lora.LoraFormatError(f"{e}; pass the base model it was trained for (`stepdistill inspect {file}` "
                                   "tells which)") from None


def load_loras_into_pipeline(pipe, loras: list[tuple[str, float]], fuse: bool = False,
                             verify: bool = True) -> list[str]:
    """Load LoRA files (kohya or diffusers layout) as named adapters and activate them with their weights
    (``set_adapters``); with ``fuse`` fold them into the base weights. Each load is checked layer by layer
    against the file (a silently dropped layer raises). Returns the ``stepdistill.method`` of each file
    ("lcd", "reflow", or "" for foreign LoRAs)."""
    names, weights, methods = [], [], []
    for i, (path, weight) in enumerate(loras):
        file = lora_file(path)
        name = f"lora{i}_{file.parent.name if file.name == lora.LORA_WEIGHT_NAME else file.stem}"
        name = "".join(ch if ch.isalnum() else "_" for ch in name)
        metadata, _ = load_lora_adapter(pipe, file, name, verify)
        names.append(name)
        weights.append(weight)
        methods.append(metadata.get("stepdistill.method", ""))
    pipe.set_adapters(names, adapter_weights=weights)
    if fuse:
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    return methods


# ----------------------------------------------------------------------------------------------------
# the sampler an adapter is meant for


def lora_file(path: str | Path) -> Path:
    """A LoRA file, or the ``pytorch_lora_weights.safetensors`` in a directory; it must exist."""
    file = lora.resolve_lora_file(path) if Path(path).is_dir() else Path(path)
    if not file.exists():
        raise FileNotFoundError(f"LoRA file {file} not found; pass a .safetensors file or a directory holding "
                                f"{lora.LORA_WEIGHT_NAME}")
    return file


def lora_metadata(loras: list[tuple[str, float]]) -> list[dict[str, str]]:
    """The safetensors header of each ``(path, weight)``."""
    return [lora.read_lora(lora_file(path))[1] for path, _ in loras]


def sampler_from_lora(metadatas: list[dict[str, str]]) -> tuple[str | None, int | None]:
    """``(sampler, num_windows)`` the adapters were trained for, from their headers (written from the method's
    model card): ``"lcm"`` when an LCD adapter is among them, else ``"perflow"`` (with the header's window count)
    for reflow ones, ``(None, None)`` when no header tells (foreign LoRAs such as style adapters)."""
    # an adversarial adapter names the method whose sampler it keeps in ``stepdistill.distillation``
    kinds = {m.get("stepdistill.distillation") or m.get("stepdistill.method", "") for m in metadatas}
    if "lcd" in kinds:
        return "lcm", None
    if "reflow" in kinds:
        windows = [int(m["stepdistill.num_windows"]) for m in metadatas if m.get("stepdistill.num_windows")]
        return "perflow", windows[0] if windows else None
    return None, None


def apply_sampler(pipe, sampler: str, steps: int, num_windows: int | None = None):
    """Put ``sampler`` on ``pipe`` for a ``steps``-step run, always built from the pipeline's original scheduler
    config (remembered on first use), so one run's settings never leak into the next: DDIM gets trailing spacing
    below 25 steps and the model's own spacing from 25 on; ``perflow`` is the PeRFlow scheduler with
    ``num_windows`` windows (default 4)."""
    base = getattr(pipe, "_stepdistill_base_scheduler", None)
    if base is None:
        base = pipe.scheduler
        pipe._stepdistill_base_scheduler = base
    pipe.scheduler = base
    check_sampling_args(steps, 1.0)
    if sampler == "perflow":
        pipe.scheduler = PiecewiseRectifiedFlowScheduler.from_config(base.config, num_windows=num_windows or DEFAULT_NUM_WINDOWS)
    elif sampler == "ddim":
        set_scheduler(pipe, "ddim", trailing=steps < 25)
    else:
        set_scheduler(pipe, sampler)
    return pipe
