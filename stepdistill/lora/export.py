"""Portability of adapters: a LoRA read from any layout stepdistill knows into one in-memory :class:`Adapter`,
and written back in the layout a tool wants (``stepdistill export``), keeping the ``stepdistill.*`` metadata
(method, recommended sampler/steps/guidance) and making the ``diffusers`` round trip exact (alpha folding,
:mod:`stepdistill.lora.diffusers_layout`).

Formats written by :func:`write_adapter`
-----------------------------------------
``kohya`` (UNet LoRAs)
    ``lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha`` -- :func:`stepdistill.lora.to_kohya`.
    Loads in diffusers (tested), ComfyUI, A1111/Forge (mapping read in their source, see
    :mod:`stepdistill.lora.kohya`).
``diffusers`` (UNet or transformer LoRAs)
    ``unet.<path>.lora_A.weight / .lora_B.weight`` (``transformer.<path>...`` for transformers), the
    ``alpha / r`` scale folded into ``lora_B`` (no per-layer alpha exists in this layout).
``comfy-flow`` (transformer LoRAs only)
    ``transformer.<path>.lora_A.weight / .lora_B.weight`` with alpha folded into ``lora_B``, or the onetrainer
    ``lora_transformer_*`` keys -- see :mod:`stepdistill.lora.flow_formats`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models.family import family_of_model
from ..models.pipeline import resolve_component
from .base_model_tags import infer_family, ss_version
from .diffusers_layout import FOLDED_ALPHA_KEY, folded_alpha_value, unfold_alpha
from .errors import LoraFormatError
from .files import default_title, lora_layers_from_state_dict, open_safetensors, read_lora, resolve_lora_file
from .flow_formats import FLOW_KEYS, is_flow_state_dict, read_flow, write_flow
from .layers import LoraLayers, check_pair, layers_not_fitting
from .metadata import metadata_str, passthrough_metadata
from .save import save_lora

FORMATS = ("kohya", "diffusers", "comfy-flow")


@dataclass
class Adapter:
    """A LoRA in memory: ``layers`` ``{module path: (down, up, alpha)}`` of one component, plus its header."""

    layers: LoraLayers
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = ""           # as read: kohya, diffusers, peft, diffusers_legacy, comfy-flow, onetrainer
    component: str = "unet"    # "unet" or "transformer"
    path: Path | None = None


def read_adapter(path: str | os.PathLike, base_model=None) -> Adapter:
    """Read a LoRA file in any layout stepdistill knows (UNet: kohya, diffusers, peft, legacy; transformer:
    ``transformer.*`` or ``lora_transformer_*``). ``base_model``: the UNet / transformer (or a pipeline) to match
    kohya names against and check shapes. Malformed files raise :class:`LoraFormatError`."""
    model = resolve_component(base_model)
    p, state_dict, metadata = open_safetensors(path)
    if not state_dict:
        raise LoraFormatError(f"{p} holds no tensors")
    if is_flow_state_dict(state_dict):
        layers, fmt = read_flow(state_dict, str(p), model)
        component = "transformer"
        if model is not None:
            bad = layers_not_fitting(layers, model)
            if bad:
                raise LoraFormatError(f"{p}: LoRA layers that do not match the base model: "
                                      + ", ".join(sorted(bad)[:10]) + " -- was this LoRA trained for a different base?")
    else:
        sd, metadata, fmt = read_lora(p)
        try:
            layers = lora_layers_from_state_dict(sd, fmt, model)
        except LoraFormatError as e:
            hint = "" if model is not None or "pass unet=" not in str(e) else " (pass --base MODEL to match names)"
            raise LoraFormatError(f"{p}: {e}{hint}") from None
        component = "unet"
    if not layers:
        raise LoraFormatError(f"{p} holds no LoRA layers")
    layers = unfold_alpha(layers, metadata)
    return Adapter(layers=layers, metadata=metadata, format=fmt, component=component, path=p)


def write_adapter(
    adapter: Adapter | Mapping[str, tuple],
    out: str | os.PathLike,
    format: str,
    *,
    component: str | None = None,
    family: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    title: str | None = None,
    flow_keys: str = "transformer",
    allow_unmapped: bool = False,
) -> Path:
    """Write a LoRA in ``format`` (``kohya``, ``diffusers``, ``comfy-flow``); returns the file path.

    ``out`` ending in ``.safetensors`` is the file, otherwise a directory receiving
    ``pytorch_lora_weights.safetensors``. ``dtype`` defaults to the tensors' own dtype (a lossless export).
    ``metadata`` entries are added to the header (the adapter's own header is carried over, minus the
    keys that describe the layout, which are regenerated).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if flow_keys not in FLOW_KEYS:
        raise ValueError(f"flow_keys must be one of {FLOW_KEYS}, got {flow_keys!r}")
    if isinstance(adapter, Adapter):
        layers, component, base_md = adapter.layers, component or adapter.component, adapter.metadata
    else:
        layers, component, base_md = dict(adapter), component or "unet", {}
    if not layers:
        raise LoraFormatError("no LoRA layers to write")
    for p, (d, u, _) in layers.items():
        check_pair(p, d, u)
    dtype = dtype or next(iter(layers.values()))[0].dtype
    path = resolve_lora_file(out)
    extra = passthrough_metadata(base_md)
    extra.update({k: metadata_str(v) for k, v in (metadata or {}).items()})
    if isinstance(adapter, Adapter) and adapter.format:
        extra["stepdistill.export_source_format"] = adapter.format
    title = title or extra.pop("modelspec.title", None) or default_title(path)
    family = family or infer_family(layers, component, base_md)[0]

    if component == "unet":
        if format == "comfy-flow":
            raise ValueError("comfy-flow is the layout for transformer (SD3/FLUX) LoRAs; this is a UNet LoRA -- "
                             "use --format kohya (ComfyUI, A1111/Forge and diffusers all map lora_unet_* keys)")
        if format == "diffusers":
            folded = folded_alpha_value(layers)
            if folded is not None:
                extra[FOLDED_ALPHA_KEY] = folded
        return save_lora(path, layers, format=format, base_model_version=ss_version(family),
                         metadata=extra, dtype=dtype, title=title)
    if component != "transformer":
        raise ValueError(f"component must be 'unet' or 'transformer', got {component!r}")
    return write_flow(layers, path, format, family=family, title=title, extra=extra, dtype=dtype,
                      flow_keys=flow_keys, allow_unmapped=allow_unmapped)


def export_lora(src, dst, format: str, base=None, dtype: torch.dtype | None = None, title: str | None = None,
                flow_keys: str = "transformer", allow_unmapped: bool = False,
                family: str | None = None) -> tuple[Path, Adapter]:
    """Read ``src`` (any supported layout), write it to ``dst`` in ``format``; returns (path, adapter read).
    ``family`` overrides the base family (otherwise: ``base``'s, the header's, or inferred from key names)."""
    model = resolve_component(base)
    adapter = read_adapter(src, model)
    if family is None:
        family = infer_family(adapter.layers, adapter.component, adapter.metadata, model)[0]
        model_family = family_of_model(model) if model is not None else None
        if model_family is not None and adapter.component == "unet":
            family = model_family.base_model_tag(model)
    path = write_adapter(adapter, dst, format, family=family, dtype=dtype, title=title, flow_keys=flow_keys,
                         allow_unmapped=allow_unmapped)
    return path, adapter
