"""Transformer (flow-matching: SD3 / FLUX.1) LoRA layouts, and which of their modules ComfyUI maps.

``transformer.<path>.lora_A.weight / .lora_B.weight`` with alpha folded into ``lora_B`` (``comfy-flow``, the
default): the "regular diffusers SD3 / Flux LoRA format" ComfyUI's ``comfy/lora.py: model_lora_keys_unet``
maps (``key_map["transformer.{k}"]`` for ``SD3`` and ``Flux`` models; a LoRA without ``.alpha`` keys is applied
with scale 1 in ``comfy/weight_adapter/lora.py``), and the layout diffusers' ``SD3LoraLoaderMixin`` /
``FluxLoraLoaderMixin`` load (tested on tiny SD3/FLUX transformers). kohya's ``lora_unet_`` names do not exist
for transformers. Modules ComfyUI's diffusers->comfy tables (``comfy/utils.py: mmdit_to_diffusers`` /
``flux_to_diffusers``) do not list are refused unless ``allow_unmapped`` (:func:`comfy_unmapped`).

With ``flow_keys="onetrainer"``: ``lora_transformer_<path with _>.lora_down / lora_up / alpha`` (ComfyUI maps
it as "onetrainer"; diffusers 0.42.1 does NOT load it -- measured: FLUX raises on the feed-forward keys, SD3
drops every layer), so it is for ComfyUI only. ComfyUI itself was not run here: the mapping was read in its
source (comfyanonymous/ComfyUI, ``comfy/lora.py`` at 41444b5 and later).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..atomic import atomic_save_file
from .diffusers_layout import FOLDED_ALPHA_KEY, folded_alpha_value, folded_pairs
from .errors import LoraFormatError
from .kohya import check_kohya_groups, group_by_layer, group_layers, kohya_style_tensors, split_module_name
from .layers import LoraLayers, lora_targetable_modules, pairs_to_layers, underscored_names
from .metadata import flow_metadata

FLOW_KEYS = ("transformer", "onetrainer")
ONETRAINER_PREFIX = "lora_transformer_"

# --- which diffusers transformer modules ComfyUI maps (comfy/utils.py, read in ComfyUI's source) -----------
_COMFY_FLUX_DOUBLE = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "norm1.linear", "norm1_context.linear", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2",
)
_COMFY_FLUX_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out")
_COMFY_FLUX_TOP = (
    "proj_out", "x_embedder", "context_embedder", "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
    "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
)
_COMFY_SD3_BLOCK = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "norm1.linear", "norm1_context.linear", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2",
)
_COMFY_SD3_TOP = (
    "context_embedder", "pos_embed.proj", "norm_out.linear", "proj_out",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
)

# Module-name vocabulary of diffusers' SD3/FLUX transformers, to invert "_"-joined onetrainer names.
_TRANSFORMER_NAME_PARTS = {
    "transformer_blocks", "single_transformer_blocks", "attn", "attn2", "to_q", "to_k", "to_v", "to_out",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff", "ff_context", "net", "proj", "norm1",
    "norm1_context", "norm", "linear", "proj_mlp", "proj_out", "x_embedder", "context_embedder",
    "time_text_embed", "timestep_embedder", "text_embedder", "guidance_embedder", "linear_1", "linear_2",
    "norm_out", "pos_embed",
}


def comfy_unmapped(paths, family: str) -> list[str]:
    """Module paths ComfyUI's diffusers->comfy table for ``family`` (``sd3``/``flux1``) does not list."""
    def ok(p: str) -> bool:
        m = re.match(r"(single_transformer_blocks|transformer_blocks)\.\d+\.(.+)$", p)
        if family == "flux1":
            if m:
                return m.group(2) in (_COMFY_FLUX_SINGLE if m.group(1).startswith("single") else _COMFY_FLUX_DOUBLE)
            return p in _COMFY_FLUX_TOP
        if family == "sd3":
            if m:
                return m.group(1) == "transformer_blocks" and m.group(2) in _COMFY_SD3_BLOCK
            return p in _COMFY_SD3_TOP
        # unknown flow family: accept what either table maps
        return not comfy_unmapped([p], "flux1") or not comfy_unmapped([p], "sd3")

    return sorted(p for p in paths if not ok(p))


# ----------------------------------------------------------------------------------------------- reading


def is_flow_state_dict(keys) -> bool:
    """Whether the keys are a transformer LoRA's (``transformer.*`` or ``lora_transformer_*``)."""
    return any(k.startswith(("transformer.", ONETRAINER_PREFIX)) for k in keys)


def read_flow(state_dict: Mapping[str, torch.Tensor], where: str, model=None) -> tuple[LoraLayers, str]:
    """``(layers, format)`` of a transformer LoRA state dict: ``comfy-flow`` (``transformer.*``, optional
    ``.alpha`` keys) or ``onetrainer`` (names matched against ``model`` when given)."""
    keys = sorted(state_dict)
    foreign = [k for k in keys if not k.startswith(("transformer.", ONETRAINER_PREFIX))]
    if foreign:
        raise LoraFormatError(
            f"{where}: transformer LoRA with non-transformer keys (text-encoder LoRAs are not supported): "
            + ", ".join(foreign[:6]))
    if any(k.startswith(ONETRAINER_PREFIX) for k in keys):
        if any(k.startswith("transformer.") for k in keys):
            raise LoraFormatError(f"{where}: mixes transformer.* and lora_transformer_* keys")
        return _read_onetrainer(state_dict, where, model), "onetrainer"

    sd = {k[len("transformer."):]: v for k, v in state_dict.items()}
    alphas = {k[: -len(".alpha")]: v for k, v in sd.items() if k.endswith(".alpha")}
    pairs = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    others = [k for k in pairs if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if others:
        raise LoraFormatError(f"{where}: unsupported entries (plain LoRA only): " + ", ".join(others[:8]))
    try:
        layers = pairs_to_layers(pairs, ".lora_A.weight", ".lora_B.weight", where)
    except LoraFormatError as e:
        raise LoraFormatError(f"{where}: malformed transformer LoRA: {e}") from None
    stray = sorted(set(alphas) - set(layers))
    if stray:
        raise LoraFormatError(f"{where}: alpha for layers without weights: {', '.join(stray[:6])}")
    for p, a in alphas.items():
        if a.numel() != 1:
            raise LoraFormatError(f"{where}: {p}.alpha must be a scalar")
        d, u, _ = layers[p]
        layers[p] = (d, u, float(a.item()))
    return layers, "comfy-flow"


def _read_onetrainer(state_dict: Mapping[str, torch.Tensor], where: str, model) -> LoraLayers:
    groups = group_by_layer(state_dict, ONETRAINER_PREFIX)
    try:
        check_kohya_groups(groups, ONETRAINER_PREFIX)
    except LoraFormatError as e:
        raise LoraFormatError(f"{where}: malformed onetrainer-style LoRA: {e}") from None
    by_name = underscored_names(lora_targetable_modules(model)) if model is not None else {}
    paths = {}
    for name in groups:
        if model is not None:
            cands = by_name.get(name, [])
            if len(cands) != 1:
                raise LoraFormatError(f"{where}: {ONETRAINER_PREFIX}{name} matches {len(cands)} modules of the "
                                      "base model -- was this LoRA trained for a different base?")
            paths[name] = cands[0]
        else:
            paths[name] = split_module_name(name, _TRANSFORMER_NAME_PARTS)
            if paths[name] is None:
                raise LoraFormatError(f"{where}: cannot map {ONETRAINER_PREFIX}{name} to a transformer module "
                                      "path without the model; pass --base")
    return group_layers(groups, paths)


# ----------------------------------------------------------------------------------------------- writing


def write_flow(layers: LoraLayers, path: Path, format: str, *, family: str, title: str, extra: dict[str, str],
               dtype: torch.dtype, flow_keys: str = "transformer", allow_unmapped: bool = False) -> Path:
    """Write a transformer LoRA: ``comfy-flow`` (``transformer.*``, or ``lora_transformer_*`` with
    ``flow_keys="onetrainer"``) or ``diffusers`` (``transformer.*``); ``extra``: header entries to add."""
    if format == "kohya":
        raise ValueError("kohya's lora_unet_* layout is for UNet LoRAs; for a transformer (SD3/FLUX) LoRA use "
                         "--format comfy-flow (loads in ComfyUI and diffusers) or --format diffusers")
    if format == "comfy-flow" and not allow_unmapped:
        unmapped = comfy_unmapped(layers, family)
        if unmapped:
            raise LoraFormatError(
                f"{len(unmapped)} of {len(layers)} layers are modules ComfyUI does not map for {family}: "
                + ", ".join(unmapped[:8]) + " -- pass --allow-unmapped to write them anyway (ComfyUI will report "
                "'lora key not loaded' and skip them)")
    onetrainer = format == "comfy-flow" and flow_keys == "onetrainer"
    if onetrainer:
        tensors = kohya_style_tensors(dict(sorted(layers.items())), ONETRAINER_PREFIX, dtype)
    else:
        tensors = folded_pairs(dict(sorted(layers.items())), dtype, prefix="transformer.",
                               compute_dtype=torch.float64)
        folded = folded_alpha_value(layers)
        if folded is not None:
            extra[FOLDED_ALPHA_KEY] = folded
    md = flow_metadata(layers, family, title, extra, folded=not onetrainer)
    atomic_save_file(tensors, path, md)
    return path
