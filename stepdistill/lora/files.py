"""Finding, opening and reading LoRA files: a ``.safetensors`` path, or a directory holding
``pytorch_lora_weights.safetensors`` (diffusers' name); the layout detected from the key names.

Layouts read (:func:`read_lora`):

* ``kohya``: ``lora_unet_*.lora_down/lora_up/alpha`` (:mod:`stepdistill.lora.kohya`);
* ``diffusers``: ``unet.<path>.lora_A/B.weight``, or ``transformer.<path>...`` for SD3 / FLUX transformers
  (:mod:`stepdistill.lora.diffusers_layout`);
* ``peft``: peft's own ``base_model.model.<path>.lora_A.weight`` keys (``PeftModel.save_pretrained``) or bare
  ``get_peft_model_state_dict`` keys. Read here, but diffusers loads *nothing* of such a file (only a logger
  warning "No LoRA keys associated to UNet2DConditionModel"; with a ``unet.`` prefix in front it raises
  ``NoMatchingPeftModuleError``), so stepdistill never writes it;
* ``diffusers_legacy``: ``convert_state_dict_to_diffusers`` output (``lora.down`` / ``lora.up``).

Malformed files raise :class:`LoraFormatError` naming the file and what is wrong.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .diffusers_layout import legacy_to_layers
from .errors import LoraFormatError
from .kohya import check_kohya_groups, from_kohya, group_by_layer
from .layers import LoraLayers, layers_not_fitting, pairs_to_layers

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

_LEGACY_SUFFIXES = (".lora.down.weight", ".lora.up.weight", "_lora.down.weight", "_lora.up.weight")


def resolve_lora_file(path_or_dir: str | os.PathLike) -> Path:
    """The file a LoRA path names: itself if it ends in ``.safetensors``, else ``<dir>/pytorch_lora_weights.safetensors``."""
    p = Path(path_or_dir)
    if p.suffix == ".safetensors":
        return p
    return p / LORA_WEIGHT_NAME


def default_title(path: Path) -> str:
    """``modelspec.title`` for a file nobody named: its directory's name for ``pytorch_lora_weights.safetensors``,
    else its stem."""
    return (path.parent.name if path.name == LORA_WEIGHT_NAME else path.stem) or "stepdistill LoRA"


def detect_format(keys: list[str]) -> str:
    """``kohya``, ``diffusers``, ``peft``, ``diffusers_legacy`` from the key names, or ``""`` for no LoRA keys."""
    if any(k.startswith(("lora_unet_", "lora_te")) and k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "kohya"
    if any(k.endswith(_LEGACY_SUFFIXES) for k in keys):
        # convert_state_dict_to_diffusers output: attention layers as lora.down/up, the rest as lora_A/B
        return "diffusers_legacy"
    ab = [k for k in keys if ".lora_A." in k or ".lora_B." in k]
    if ab:
        if any(k.startswith(("base_model.model.", "unet.base_model.model.")) for k in ab):
            return "peft"
        if all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in ab) or all(
                k.startswith("transformer.") for k in ab):
            return "diffusers"
        return "peft"  # bare get_peft_model_state_dict keys
    return ""


def open_safetensors(path: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """``(file, tensors, header metadata)`` of a safetensors file, or of ``pytorch_lora_weights.safetensors`` in a
    directory; an unreadable file raises :class:`LoraFormatError` naming it."""
    p = Path(path)
    if p.is_dir():
        p = p / LORA_WEIGHT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no LoRA file at {p}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraFormatError(f"{p} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    return p, state_dict, metadata


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """``(state_dict, metadata, format)`` of a LoRA file (or a directory holding ``pytorch_lora_weights.safetensors``).

    ``format`` is ``"kohya"``, ``"diffusers"`` (``unet.<path>.lora_A/B``, or ``transformer.<path>...`` for SD3/FLUX
    transformers), ``"peft"`` (``base_model.model.`` or
    bare ``<path>.lora_A/B`` keys) or ``"diffusers_legacy"`` (``lora.down``/``lora.up``). Malformed files raise
    :class:`LoraFormatError`.
    """
    p, state_dict, metadata = open_safetensors(path)
    keys = sorted(state_dict)
    fmt = detect_format(keys)
    if not fmt:
        raise LoraFormatError(
            f"{p} holds no LoRA keys ({len(keys)} tensors, e.g. {', '.join(keys[:5]) or 'none'}); expected "
            "lora_unet_*.lora_down.weight (kohya) or unet.*.lora_A.weight (diffusers)"
        )
    try:
        if fmt == "kohya":
            others = [k for k in keys if not k.startswith(("lora_unet_", "lora_te"))]
            if others:
                raise LoraFormatError(f"non-LoRA keys in a kohya file: {', '.join(others[:8])}")
            check_kohya_groups(group_by_layer(state_dict))
        elif fmt in ("diffusers", "peft"):
            pairs_to_layers(state_dict, ".lora_A.weight", ".lora_B.weight", str(p))
            others = [k for k in keys if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
            if others:
                raise LoraFormatError(f"unsupported entries (plain LoRA only): {', '.join(others[:8])}")
        else:
            legacy_to_layers({re.sub(r"^unet\.", "", k): v for k, v in state_dict.items()}, str(p))
    except LoraFormatError as e:
        raise LoraFormatError(f"{p}: malformed {fmt} LoRA: {e}") from None
    return state_dict, metadata, fmt


def lora_layers_from_state_dict(state_dict: Mapping[str, torch.Tensor], format: str, unet=None) -> LoraLayers:
    """UNet layer dict of a state dict in any layout :func:`read_lora` detects (alpha = r where none is stored)."""
    if format == "kohya":
        return from_kohya(state_dict, unet)
    if format == "diffusers":
        prefix = "transformer." if any(k.startswith("transformer.") for k in state_dict) else "unet."
        others = [k for k in state_dict if not k.startswith(prefix)]
        if others:
            raise LoraFormatError(f"LoRA keys outside the {prefix[:-1]} are not supported: "
                                  f"{', '.join(sorted(others)[:5])}")
        sd = {k[len(prefix):]: v for k, v in state_dict.items()}
        layers = pairs_to_layers(sd, ".lora_A.weight", ".lora_B.weight", "diffusers LoRA")
    elif format == "peft":
        sd = {re.sub(r"^(unet\.)?base_model\.model\.", "", k): v for k, v in state_dict.items()}
        layers = pairs_to_layers(sd, ".lora_A.weight", ".lora_B.weight", "peft LoRA")
    elif format == "diffusers_legacy":
        non_unet = [k for k in state_dict if not k.startswith("unet.")]
        if non_unet:
            raise LoraFormatError(f"non-UNet LoRA keys are not supported: {', '.join(sorted(non_unet)[:5])}")
        layers = legacy_to_layers({k[len("unet."):]: v for k, v in state_dict.items()}, "legacy diffusers LoRA")
    else:
        raise ValueError(f"unknown LoRA format {format!r}")
    if unet is not None:
        bad = layers_not_fitting(layers, unet)
        if bad:
            raise LoraFormatError(
                "LoRA keys that do not match the base model: " + ", ".join(sorted(bad)[:10])
                + " -- was this LoRA trained for a different base?"
            )
    return layers


def read_lora_layers(path: str | os.PathLike, unet=None) -> LoraLayers:
    """Layer dict of a LoRA file in any supported layout (checked against ``unet`` when given)."""
    sd, _, fmt = read_lora(path)
    return lora_layers_from_state_dict(sd, fmt, unet)
