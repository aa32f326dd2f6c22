"""The base-model tags of LoRA files: which tags a header may carry, what they mean, and which base a file
without one was trained for, read from its key names and shapes.

Tags are kohya's ``ss_base_model_version`` vocabulary (``sd_v1``, ``sd_v2``, ``sd_v2_v``, ``sdxl_base_v1-0``)
and, for the flow-matching transformers, ``sd3`` / ``flux1``; each maps to the ``modelspec.architecture`` kohya
sd-scripts' ``sai_model_spec`` writes. Telling a *model's* family is :mod:`stepdistill.models.family`'s job;
this module reads only what a file says.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Mapping

from ..models.family import family_of_model

# base_model_version (kohya's ss_base_model_version) -> (modelspec.architecture, implementation, resolution)
BASE_MODEL_VERSIONS = {
    "sd_v1": ("stable-diffusion-v1", "diffusers", "512x512"),
    "sd_v2": ("stable-diffusion-v2-512", "diffusers", "512x512"),
    "sd_v2_v": ("stable-diffusion-v2-768-v", "diffusers", "768x768"),
    "sdxl_base_v1-0": (
        "stable-diffusion-xl-v1-base",
        "https://github.com/Stability-AI/generative-models",
        "1024x1024",
    ),
}
# Flow families: ss_base_model_version-like tag -> (modelspec.architecture as kohya sd-scripts' sai_model_spec
# names it, human name). sd-scripts uses "stable-diffusion-3" (+ variant) and "flux-1" (+ "-dev"/"-schnell").
FLOW_FAMILIES = {
    "sd3": ("stable-diffusion-3", "Stable Diffusion 3 (MMDiT)"),
    "flux1": ("flux-1", "FLUX.1"),
}
UNET_FAMILY_NAMES = {
    "sd_v1": "Stable Diffusion 1.x",
    "sd_v2": "Stable Diffusion 2.x (512, epsilon)",
    "sd_v2_v": "Stable Diffusion 2.x (768, v-prediction)",
    "sdxl_base_v1-0": "Stable Diffusion XL",
}
# cross_attention_dim of a UNet LoRA (in_features of its attn2.to_k) -> tag
_CROSS_ATTENTION_TAGS = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}


def family_display_name(tag: str) -> str:
    """``Stable Diffusion XL`` for ``sdxl_base_v1-0``, ``FLUX.1`` for ``flux1``...; unknown tags as they are."""
    return UNET_FAMILY_NAMES.get(tag) or FLOW_FAMILIES.get(tag, (None, None))[1] or tag


def ss_version(family: str) -> str:
    """kohya ``ss_base_model_version`` to write for a UNet family (the toy teacher is SD1-shaped)."""
    return family if family in BASE_MODEL_VERSIONS else "sd_v1"


def infer_family(layers: Mapping[str, tuple], component: str, metadata: Mapping[str, str] | None = None,
                 model=None) -> tuple[str, str]:
    """``(family tag, how it was determined)``; tags: ``sd_v1``, ``sd_v2``, ``sd_v2_v``, ``sdxl_base_v1-0``,
    ``sd3``, ``flux1``, ``toy`` (the embedded SD1-shaped teacher, cross-attention 64) or ``unknown...``."""
    metadata = metadata or {}
    tag = metadata.get("ss_base_model_version", "")
    if tag in UNET_FAMILY_NAMES or tag in FLOW_FAMILIES:
        return tag, "metadata ss_base_model_version"
    arch = metadata.get("modelspec.architecture", "")
    for t, (a, _) in FLOW_FAMILIES.items():
        if arch.startswith(a):
            return t, "metadata modelspec.architecture"
    family = family_of_model(model) if model is not None else None
    if family is not None and family.is_flow:
        return family.base_model_tag(model), f"base model class {type(model).__name__}"
    if component == "transformer":
        paths = list(layers)
        if any(p.startswith("single_transformer_blocks.") for p in paths) or any(
                "guidance_embedder" in p or p.startswith("x_embedder") for p in paths):
            return "flux1", "key names (single_transformer_blocks / x_embedder)"
        if any(p.startswith("pos_embed.") or ".attn2." in p for p in paths):
            return "sd3", "key names (pos_embed / attn2)"
        return "sd3 or flux1", "key names (transformer_blocks only: cannot tell)"
    dims = collections.Counter(int(d.shape[1]) for p, (d, _, _) in layers.items() if p.endswith("attn2.to_k"))
    if any(p.startswith("add_embedding") for p in layers) or any(
            re.match(r"(down|up)_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.[2-9]\.", p) for p in layers):
        return "sdxl_base_v1-0", "key names (add_embedding / deep transformer blocks)"
    if dims:
        dim = dims.most_common(1)[0][0]
        if dim in _CROSS_ATTENTION_TAGS:
            return _CROSS_ATTENTION_TAGS[dim], f"cross-attention width {dim} (attn2.to_k input)"
        if dim == 64:
            return "toy", "cross-attention width 64: the stepdistill toy teacher (SD1-shaped)"
        return f"unknown (cross-attention width {dim})", "attn2.to_k input width"
    return "unknown", "no attn2.to_k layer to read the cross-attention width from"
