"""The trainable side: a peft LoRA adapter on a diffusers model, added the diffusers way (``model.add_adapter``),
its layers read out as a layer dict, and a LoRA file copied into it.

Any diffusers model with ``add_adapter`` carries one: SD 1.x/2.x/SDXL ``UNet2DConditionModel`` and the
flow-matching transformers (SD3 ``SD3Transformer2DModel``, FLUX.1 ``FluxTransformer2DModel``; default targets
in :mod:`stepdistill.models.family`). Plain LoRA only: no DoRA, LoCon/LoHa, bias or text-encoder layers.

Reading the adapter: ``peft.get_peft_model_state_dict(model, adapter_name=a)`` drops the keys of adapter ``a``
that contain ``.<b>.`` for any *other* adapter ``b`` on the model (e.g. a second adapter named ``"0"`` leaves
3 of 58 keys). :func:`unet_lora_state_dict` cross-checks its result against the LoRA modules and falls back to
reading them directly. Alpha is read as the layer's intrinsic scale (``lora_alpha / r``), so runtime
``set_adapters`` weights never leak into a saved file.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from ..models.family import LCM_LORA_TARGET_MODULES
from .errors import LoraFormatError
from .files import read_lora_layers
from .layers import LoraLayers

logger = logging.getLogger(__name__)


def add_lora_to_unet(
    unet,
    rank: int,
    alpha: float | None = None,
    target_modules: Iterable[str] = LCM_LORA_TARGET_MODULES,
    adapter_name: str = "default",
    dropout: float = 0.0,
):
    """Add a peft LoRA adapter to ``unet`` the diffusers way (``unet.add_adapter``); returns its ``LoraConfig``.
    Any diffusers model with ``add_adapter`` works (SD3 / FLUX transformers: see
    :func:`stepdistill.models.family.default_target_modules`).

    ``alpha`` defaults to ``rank`` (scale 1). Gaussian init as diffusers' LCM-LoRA example: ``lora_A`` random,
    ``lora_B`` zero, so the adapted UNet starts equal to the base. peft marks only adapter weights trainable.
    ``dropout`` is peft's ``lora_dropout`` (kohya's ``network_dropout``): dropout on each LoRA branch's input, in
    training mode only.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(rank if alpha is None else alpha),
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
        lora_dropout=float(dropout),
    )
    unet.add_adapter(config, adapter_name=adapter_name)
    if not lora_modules(unet, adapter_name):
        raise RuntimeError(f"adapter {adapter_name!r} was added but no LoRA layer carries it")
    return config


def lora_modules(model, adapter_name: str) -> dict[str, Any]:
    """{module path: peft LoraLayer} for the layers of ``model`` that carry ``adapter_name``."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})
    }


def intrinsic_scale(module, adapter_name: str) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` for rsLoRA), ignoring any runtime weight from ``set_adapters``."""
    r = module.r[adapter_name]
    alpha = module.lora_alpha[adapter_name]
    if getattr(module, "use_rslora", {}).get(adapter_name, False):
        return alpha / math.sqrt(r)
    return alpha / r


def _check_plain_lora(module, name: str, adapter_name: str):
    if getattr(module, "use_dora", {}).get(adapter_name, False):
        raise LoraFormatError(f"{name}: DoRA adapters are not supported (plain LoRA only)")
    b = module.lora_B[adapter_name]
    if getattr(b, "bias", None) is not None:
        raise LoraFormatError(f"{name}: LoRA with lora_B bias is not supported (plain LoRA only)")


def unet_lora_state_dict(unet, adapter_name: str = "default", state_dict: dict | None = None) -> LoraLayers:
    """The adapter's layers as ``{diffusers module path: (down, up, alpha)}`` (detached CPU copies).

    Weights come from ``peft.get_peft_model_state_dict`` (adapter name stripped), or from ``state_dict`` (the same
    names: e.g. gathered from an FSDP / DeepSpeed-sharded model); alpha is the kohya-style alpha giving the layer's
    intrinsic scale (``alpha / r``), so ``set_adapters`` weights do not leak into it.
    """
    if adapter_name not in (getattr(unet, "peft_config", None) or {}):
        raise KeyError(f"UNet has no LoRA adapter named {adapter_name!r}")
    modules = lora_modules(unet, adapter_name)
    expected = {f"{n}.lora_{ab}.weight" for n in modules for ab in "AB"}

    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name) if state_dict is None else state_dict
    if set(sd) != expected and state_dict is None:
        # peft filters out keys containing ".<other adapter name>." -- e.g. a second adapter called "0" removes
        # almost every key. The modules themselves are authoritative.
        logger.warning(
            "get_peft_model_state_dict(adapter_name=%r) returned %d keys for %d LoRA layers "
            "(missing %d, unexpected %d); reading the LoRA modules directly",
            adapter_name, len(sd), len(modules), len(expected - set(sd)), len(set(sd) - expected),
        )
        sd = {}
        for n, m in modules.items():
            sd[f"{n}.lora_A.weight"] = m.lora_A[adapter_name].weight
            sd[f"{n}.lora_B.weight"] = m.lora_B[adapter_name].weight

    layers: LoraLayers = {}
    for name, module in modules.items():
        _check_plain_lora(module, name, adapter_name)
        down = sd[f"{name}.lora_A.weight"].detach().to("cpu").clone().contiguous()
        up = sd[f"{name}.lora_B.weight"].detach().to("cpu").clone().contiguous()
        r = down.shape[0]
        if up.shape[1] != r or module.r[adapter_name] != r:
            raise LoraFormatError(f"{name}: rank mismatch (down {tuple(down.shape)}, up {tuple(up.shape)})")
        layers[name] = (down, up, float(intrinsic_scale(module, adapter_name) * r))
    return layers


def init_adapter_from_file(model, path: str | os.PathLike, adapter_name: str = "default") -> int:
    """Copy a LoRA file (any supported layout) into ``model``'s trainable adapter, so training continues from it
    (InstaFlow's second stage starts from the reflowed student). Same layers and ranks required; the file's
    ``alpha / r`` is folded into ``lora_B`` for the adapter's own scale, so ``W + delta`` is unchanged.
    Returns the number of layers copied."""
    layers = read_lora_layers(path, model)
    modules = lora_modules(model, adapter_name)
    missing, extra = sorted(set(modules) - set(layers)), sorted(set(layers) - set(modules))
    if missing or extra:
        raise LoraFormatError(f"init_lora {path}: its layers do not match the adapter being trained "
                              f"({len(missing)} adapter layers not in the file, e.g. {missing[:3]}; {len(extra)} file "
                              f"layers not in the adapter, e.g. {extra[:3]}); use the same lora_target_modules")
    with torch.no_grad():
        for name, (down, up, alpha) in layers.items():
            module = modules[name]
            a, b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            if down.shape != a.shape or up.shape != b.shape:
                raise LoraFormatError(f"init_lora {path}: {name} has rank {down.shape[0]}, the adapter being "
                                      f"trained rank {a.shape[0]}; set lora_rank to the file's rank")
            a.copy_(down.to(a))
            b.copy_((up.float() * (alpha / down.shape[0]) / intrinsic_scale(module, adapter_name)).to(b))
    return len(layers)
