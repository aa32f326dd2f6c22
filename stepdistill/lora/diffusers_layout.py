"""diffusers' LoRA layout, and the alpha folding it needs.

``unet.<path>.lora_A.weight`` / ``unet.<path>.lora_B.weight`` (``transformer.<path>...`` for SD3 / FLUX
transformers) is what ``StableDiffusionPipeline.save_lora_weights`` writes; for UNets stepdistill produces it
with that very function. The layout has no per-layer alpha: without diffusers' ``lora_adapter_metadata`` a
loader assumes ``alpha == r`` (scale 1). It is a diffusers-only layout for UNets: ComfyUI does not map its
attention keys (see :mod:`stepdistill.lora.kohya`).

Alpha folding
-------------
So the ``alpha / r`` scale is folded into ``lora_B`` before writing (``lora_B = up * alpha / r``), which makes
the file load correctly with or without metadata support. To make ``kohya -> diffusers -> kohya`` give back the
original tensors, the original alphas are recorded in the header (``stepdistill.folded_alpha``: one number, or
a JSON object ``{path: alpha}`` when they differ) and :func:`unfold_alpha` undoes the folding on reading. The
round trip is bit-exact when ``alpha / r`` is a power of two (e.g. alpha = r, 2r, r/2) and exact to the storage
dtype's rounding otherwise; the effective update ``alpha / r * up @ down`` is preserved either way.

Older diffusers keys (``convert_state_dict_to_diffusers``: ``...to_q.lora.down.weight``, and the
attention-processor keys ``attn1.processor.to_q_lora.down.weight``) are read by :func:`legacy_to_layers`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import LoraFormatError
from .layers import LoraLayers, check_pair, pairs_to_layers

FOLDED_ALPHA_KEY = "stepdistill.folded_alpha"


def to_diffusers(lora_layers: Mapping[str, tuple], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """peft-style ``{path}.lora_A.weight`` / ``lora_B.weight`` dict with the ``alpha / r`` scale folded into B."""
    return folded_pairs(lora_layers, dtype)


def folded_pairs(lora_layers: Mapping[str, tuple], dtype: torch.dtype, prefix: str = "",
                 compute_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``<prefix><path>.lora_A.weight`` / ``.lora_B.weight`` in ``dtype``, ``lora_B = up * alpha / r`` computed in
    ``compute_dtype`` (UNet files: float32; transformer files: float64). Copies: layers that share a tensor
    still write."""
    out = {}
    for path, (down, up, alpha) in lora_layers.items():
        check_pair(path, down, up)
        r = down.shape[0]
        out[f"{prefix}{path}.lora_A.weight"] = down.detach().to("cpu", dtype).clone().contiguous()
        out[f"{prefix}{path}.lora_B.weight"] = (
            up.detach().to(compute_dtype).cpu() * (float(alpha) / r)).to(dtype).contiguous()
    return out


def diffusers_unet_tensors(lora_layers: Mapping[str, tuple], file: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The ``unet.*`` tensors ``StableDiffusionPipeline.save_lora_weights`` writes for ``lora_layers`` (alpha
    folded), captured instead of written (``file`` only names them): the caller writes the file itself."""
    peft_sd = to_diffusers(lora_layers, dtype=dtype)
    captured: dict[str, torch.Tensor] = {}

    def _capture(weights, filename):  # diffusers packs the "unet." prefix; we write the file ourselves
        captured.update(weights)

    from diffusers import StableDiffusionPipeline  # heavy: the pipeline module pulls in transformers' image processors

    StableDiffusionPipeline.save_lora_weights(
        str(file.parent), unet_lora_layers=peft_sd, weight_name=file.name, save_function=_capture,
        safe_serialization=True,
    )
    if len(captured) != len(peft_sd) or not all(k.startswith("unet.") for k in captured):
        raise RuntimeError("diffusers' save_lora_weights did not produce the expected unet.* keys")
    return {k: v.contiguous() for k, v in captured.items()}


def legacy_to_layers(state_dict: Mapping[str, torch.Tensor], what: str) -> LoraLayers:
    """Layers of a ``convert_state_dict_to_diffusers``-style dict (``.lora.down/up`` mixed with ``.lora_A/B``;
    also the older attention-processor keys ``attn1.processor.to_q_lora.down.weight``)."""

    def _norm(key: str) -> str:
        key = re.sub(r"\.processor\.to_out_lora\.(down|up)\.weight$", r".to_out.0.lora.\1.weight", key)
        return re.sub(r"\.processor\.(to_[qkv])_lora\.(down|up)\.weight$", r".\1.lora.\2.weight", key)

    state_dict = {_norm(k): v for k, v in state_dict.items()}
    legacy = {k: v for k, v in state_dict.items() if k.endswith((".lora.down.weight", ".lora.up.weight"))}
    ab = {k: v for k, v in state_dict.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    others = sorted(set(state_dict) - set(legacy) - set(ab))
    if others:
        raise LoraFormatError(f"{what}: unsupported entries (plain LoRA only): {', '.join(others[:8])}")
    layers = pairs_to_layers(legacy, ".lora.down.weight", ".lora.up.weight", what)
    layers.update(pairs_to_layers(ab, ".lora_A.weight", ".lora_B.weight", what))
    return layers


def folded_alpha_value(layers: LoraLayers) -> str | None:
    """The ``stepdistill.folded_alpha`` header value recording the alphas folding loses (None: all alpha == r)."""
    alphas = {p: float(a) for p, (d, _, a) in layers.items()}
    if all(a == d.shape[0] for p, (d, _, a) in layers.items()):
        return None
    distinct = set(alphas.values())
    return json.dumps(next(iter(distinct)) if len(distinct) == 1 else alphas, sort_keys=True)


def unfold_alpha(layers: LoraLayers, metadata: Mapping[str, str]) -> LoraLayers:
    """Undo the alpha folding of a diffusers-layout file written by stepdistill (header ``stepdistill.folded_alpha``)."""
    raw = metadata.get(FOLDED_ALPHA_KEY)
    if raw is None:
        return layers
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraFormatError(f"bad {FOLDED_ALPHA_KEY} metadata {raw!r}: {e}") from None
    out = {}
    for path, (down, up, alpha) in layers.items():
        r = down.shape[0]
        orig = float(value.get(path, r) if isinstance(value, dict) else value)
        if alpha != r or orig == r:  # not folded (or nothing to undo)
            out[path] = (down, up, alpha)
            continue
        scale = orig / r
        out[path] = (down, (up.double() / scale).to(up.dtype), orig)
    return out
