"""Saving a UNet LoRA (:func:`save_lora`) in a layout every tool loads, atomically.

``format="kohya"`` (default; :mod:`stepdistill.lora.kohya`) loads in diffusers, ComfyUI/Forge, A1111 and
kohya's scripts; ``format="diffusers"`` (:mod:`stepdistill.lora.diffusers_layout`, alpha folded into
``lora_B``) in diffusers. fp16 by default, UNet only; the header carries kohya's ``ss_*`` and the SAI
``modelspec.*`` keys (:mod:`stepdistill.lora.metadata`).

Why not the other save paths (checked against diffusers 0.42.1 / peft 0.21.2 on an SD-shaped UNet with the
14 LCM-LoRA target types, rank 4, alpha 8 -- 115 LoRA layers):

* ``StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=get_peft_model_state_dict(unet))`` (the
  LCM-LoRA training example): all 115 layers load, but with ``lora_alpha`` reset to ``r``; every layer's
  delta is off by ``alpha / r`` (here 2x). Correct only when alpha == rank, or when
  ``unet_lora_adapter_metadata=`` is passed (diffusers-only; other tools ignore it).
* ``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`` then ``save_lora_weights``: keys become
  ``...to_q.lora.down.weight``; loading *silently drops all 56 attention projections* (to_q/k/v/out.0; only a
  ``RuntimeWarning`` from peft), and the 59 layers that do load have the alpha error above.
* peft's own ``base_model.model.<path>.lora_A.weight`` keys (``PeftModel.save_pretrained``): diffusers loads
  *nothing* (see :mod:`stepdistill.lora.files`).
* diffusers-style ``unet.<path>.lora_A`` keys: ComfyUI does not map their attention layers
  (see :mod:`stepdistill.lora.kohya`).

:func:`stepdistill.lora.verify.verify_lora_loaded` catches all of the above after ``pipe.load_lora_weights``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_save_file
from .diffusers_layout import diffusers_unet_tensors
from .errors import LoraFormatError
from .files import default_title, resolve_lora_file
from .kohya import to_kohya
from .metadata import build_metadata
from .peft_adapter import unet_lora_state_dict


def save_lora(
    path_or_dir: str | os.PathLike,
    unet,
    *,
    format: str = "kohya",
    base_model_version: str = "sd_v1",
    metadata: Mapping[str, Any] | None = None,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float16,
    title: str | None = None,
) -> Path:
    """Write the UNet's LoRA adapter (or a layer dict passed as ``unet``) to safetensors, atomically; returns the path.

    A path ending in ``.safetensors`` is the file, anything else a directory receiving
    ``pytorch_lora_weights.safetensors``. ``format="kohya"`` (default; every tool) or ``"diffusers"``
    (``save_lora_weights`` layout, alpha folded into lora_B). ``metadata`` adds string-valued header entries,
    e.g. ``{"stepdistill.method": "lcm", "stepdistill.recommended_steps": 4}``.
    """
    layers = unet_lora_state_dict(unet, adapter_name) if not isinstance(unet, Mapping) else dict(unet)
    if not layers:
        raise LoraFormatError(f"adapter {adapter_name!r} has no LoRA layers")
    path = resolve_lora_file(path_or_dir)

    if format == "kohya":
        tensors = to_kohya(layers, dtype=dtype)
        md_layers = layers
    elif format == "diffusers":
        tensors = diffusers_unet_tensors(layers, path, dtype)
        md_layers = {p: (d, u, float(d.shape[0])) for p, (d, u, _) in layers.items()}  # alpha now folded in
    else:
        raise ValueError(f"format must be 'kohya' or 'diffusers', got {format!r}")

    md = build_metadata(md_layers, base_model_version=base_model_version, title=title or default_title(path),
                        extra=metadata)
    atomic_save_file(tensors, path, md)
    return path
