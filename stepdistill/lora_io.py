"""LoRA file I/O: add a LoRA to a diffusers UNet, save it in a layout every tool loads, read it back, and
check that a stock diffusers pipeline really received every layer.

File layout
-----------
The default (``format="kohya"``) is kohya-ss' layout, the one diffusers, ComfyUI/Forge, A1111 and kohya's
scripts all read, and the one the published LCM-LoRA files use (``pytorch_lora_weights.safetensors``)
(diffusers: loaded and compared layer by layer in the tests; ComfyUI's ``model_lora_keys_unet`` and A1111's
``convert_diffusers_name_to_compvis`` map these names by their source, not run here)::

    lora_unet_<diffusers module path, "." -> "_">.lora_down.weight   (r, in) | conv: (r, in, kh, kw)
    lora_unet_<diffusers module path, "." -> "_">.lora_up.weight     (out, r) | conv: (out, r, 1, 1)
    lora_unet_<diffusers module path, "." -> "_">.alpha              0-dim tensor

fp16, UNet only, effective update ``delta W = alpha / r * up @ down``. The safetensors header carries kohya's
``ss_*`` keys and the SAI ``modelspec.*`` keys (all values strings, as the format requires).

``format="diffusers"`` writes what ``StableDiffusionPipeline.save_lora_weights`` writes
(``unet.<path>.lora_A.weight`` / ``unet.<path>.lora_B.weight``, produced here by that very function). That
layout has no per-layer alpha: without diffusers' ``lora_adapter_metadata`` a loader assumes
``alpha == r`` (scale 1). So the ``alpha / r`` scale is folded into ``lora_B`` before writing, which makes the
file load correctly with or without metadata support. It is a diffusers-only layout: ComfyUI does not map
its attention keys (see below).

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
  *nothing* (only a logger warning "No LoRA keys associated to UNet2DConditionModel"); with a ``unet.`` prefix
  in front it raises ``NoMatchingPeftModuleError``.
* ComfyUI (``comfy/lora.py: model_lora_keys_unet``) maps diffusers-style UNet keys only as
  ``unet.<path>`` with ``.to_`` rewritten to ``.processor.to_`` (the pre-peft attention-processor names), so the
  attention layers of a peft-style ``unet....attn1.to_q.lora_A.weight`` file are reported "lora key not loaded";
  ``lora_unet_<path with _>`` keys are mapped for every UNet weight.
* ``peft.get_peft_model_state_dict(unet, adapter_name=a)`` drops the keys of adapter ``a`` that contain
  ``.<b>.`` for any *other* adapter ``b`` on the model (e.g. a second adapter named ``"0"`` leaves 3 of 58
  keys). :func:`unet_lora_state_dict` cross-checks its result against the LoRA modules and falls back to
  reading them directly.

:func:`verify_lora_loaded` catches all of the above after ``pipe.load_lora_weights``: it compares each
layer's effective delta in the pipeline's UNet with the trained one.

Scope: SD 1.x/2.x-style ``UNet2DConditionModel`` LoRAs (plain LoRA; no DoRA, LoCon/LoHa, bias or text-encoder
layers). For SDXL, kohya's own trainer writes sgm (``input_blocks``) names; diffusers and ComfyUI also map the
diffusers-path names written here, A1111 was not checked.

Flow-matching transformers (SD3 ``SD3Transformer2DModel``, FLUX.1 ``FluxTransformer2DModel``): the same peft
adapter (:func:`add_lora_to_unet` takes any diffusers model with ``add_adapter``; default targets
:data:`SD3_LORA_TARGET_MODULES` / :data:`FLUX_LORA_TARGET_MODULES`), written by
:func:`stepdistill.export.write_adapter` as ``transformer.<path>.lora_A/B.weight`` (alpha folded into ``lora_B``),
the layout ``SD3LoraLoaderMixin`` / ``FluxLoraLoaderMixin`` and ComfyUI both read. :func:`read_lora`,
:func:`read_lora_layers` and :func:`verify_lora_loaded` accept those files and pipelines too.
"""
from __future__ import annotations

import collections
import datetime
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# The 14 module types diffusers' LCM-LoRA example (train_lcm_distill_lora_sd.py) adapts.
LCM_LORA_TARGET_MODULES = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]

# Transformer LoRA targets: the attention projections of both streams (image: to_q/k/v/to_out.0; text:
# add_q/k/v_proj/to_add_out) and the feed-forwards of both streams, as diffusers' train_dreambooth_lora_flux.py
# (its default 12; SD3's example adds the feed-forwards with --lora_layers). FLUX adds its single-stream blocks'
# proj_mlp / proj_out (their attention shares attn.to_q/k/v); "proj_out" also matches the final output layer.
# All of these are modules ComfyUI maps for SD3 / FLUX (stepdistill.export.comfy_unmapped).
_TRANSFORMER_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                          "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_TRANSFORMER_FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
SD3_LORA_TARGET_MODULES = _TRANSFORMER_ATTENTION + _TRANSFORMER_FF
FLUX_LORA_TARGET_MODULES = _TRANSFORMER_ATTENTION + _TRANSFORMER_FF + ["proj_mlp", "proj_out"]

KOHYA_PREFIX = "lora_unet_"
KOHYA_NETWORK_MODULE = "networks.lora"

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

# Metadata keys that describe the tensors themselves; a caller may not override them.
_STRUCTURAL_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha")

# {diffusers module path: (down, up, alpha)}; delta W = alpha / r * up @ down, r = down.shape[0]
LoraLayers = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


class LoraFormatError(ValueError):
    """A file or state dict is not a (supported) LoRA, or does not fit the base model."""


class LoraLoadError(RuntimeError):
    """A LoRA did not arrive intact in a pipeline; ``.report`` holds the :class:`LoraLoadReport`."""

    def __init__(self, message: str, report: "LoraLoadReport"):
        super().__init__(message)
        self.report = report


# ----------------------------------------------------------------------------------------------- training side


def denoiser_of(pipe_or_model):
    """The LoRA-carrying model of a pipeline (``unet`` or ``transformer``); a model is returned as is."""
    for name in ("unet", "transformer"):
        model = getattr(pipe_or_model, name, None)
        if isinstance(model, torch.nn.Module):
            return model
    if isinstance(pipe_or_model, torch.nn.Module):
        return pipe_or_model
    raise TypeError(f"{type(pipe_or_model).__name__} has neither a unet nor a transformer")


def default_target_modules(model) -> list[str]:
    """The LoRA targets for ``model``: LCM-LoRA's 14 for UNets, the SD3 / FLUX lists for those transformers."""
    name = type(getattr(model, "module", model)).__name__
    if "Flux" in name:
        return list(FLUX_LORA_TARGET_MODULES)
    if "SD3" in name:
        return list(SD3_LORA_TARGET_MODULES)
    return list(LCM_LORA_TARGET_MODULES)


def add_lora_to_unet(
    unet,
    rank: int,
    alpha: float | None = None,
    target_modules: Iterable[str] = LCM_LORA_TARGET_MODULES,
    adapter_name: str = "default",
):
    """Add a peft LoRA adapter to ``unet`` the diffusers way (``unet.add_adapter``); returns its ``LoraConfig``.
    Any diffusers model with ``add_adapter`` works (SD3 / FLUX transformers: see :func:`default_target_modules`).

    ``alpha`` defaults to ``rank`` (scale 1). Gaussian init as diffusers' LCM-LoRA example: ``lora_A`` random,
    ``lora_B`` zero, so the adapted UNet starts equal to the base. peft marks only adapter weights trainable.
    """
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(rank if alpha is None else alpha),
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    unet.add_adapter(config, adapter_name=adapter_name)
    if not _lora_modules(unet, adapter_name):
        raise RuntimeError(f"adapter {adapter_name!r} was added but no LoRA layer carries it")
    return config


def _lora_modules(model, adapter_name: str) -> dict[str, Any]:
    """{module path: peft LoraLayer} for the layers of ``model`` that carry ``adapter_name``."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})
    }


def _intrinsic_scale(module, adapter_name: str) -> float:
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


def unet_lora_state_dict(unet, adapter_name: str = "default") -> LoraLayers:
    """The adapter's layers as ``{diffusers module path: (down, up, alpha)}`` (detached CPU copies).

    Weights come from ``peft.get_peft_model_state_dict`` (adapter name stripped); alpha is the kohya-style alpha
    giving the layer's intrinsic scale (``alpha / r``), so ``set_adapters`` weights do not leak into it.
    """
    from peft import get_peft_model_state_dict

    if adapter_name not in (getattr(unet, "peft_config", None) or {}):
        raise KeyError(f"UNet has no LoRA adapter named {adapter_name!r}")
    modules = _lora_modules(unet, adapter_name)
    expected = {f"{n}.lora_{ab}.weight" for n in modules for ab in "AB"}

    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    if set(sd) != expected:
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
        layers[name] = (down, up, float(_intrinsic_scale(module, adapter_name) * r))
    return layers


def init_adapter_from_file(model, path: str | os.PathLike, adapter_name: str = "default") -> int:
    """Copy a LoRA file (any supported layout) into ``model``'s trainable adapter, so training continues from it
    (InstaFlow's second stage starts from the reflowed student). Same layers and ranks required; the file's
    ``alpha / r`` is folded into ``lora_B`` for the adapter's own scale, so ``W + delta`` is unchanged.
    Returns the number of layers copied."""
    layers = read_lora_layers(path, model)
    modules = _lora_modules(model, adapter_name)
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
                raise LoraFormatError(f"init_lora {path}: {name} has rank {down.shape[0]}, the adapter being trained "
                                    f"rank {a.shape[0]}; set lora_rank to the file's rank")
            a.copy_(down.to(a))
            b.copy_((up.float() * (alpha / down.shape[0]) / _intrinsic_scale(module, adapter_name)).to(b))
    return len(layers)


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """Effective weight update ``alpha / r * up @ down``, flattened to (out, in * kh * kw), float32."""
    r = down.shape[0]
    return (alpha / r) * (up.float().flatten(1) @ down.float().flatten(1))


# ----------------------------------------------------------------------------------------------- kohya layout


def kohya_name(module_path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return KOHYA_PREFIX + module_path.replace(".", "_")


def to_kohya(lora_layers: Mapping[str, tuple], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Flat kohya state dict (``lora_down`` / ``lora_up`` / 0-dim ``alpha``, all in ``dtype``) of a layer dict."""
    out: dict[str, torch.Tensor] = {}
    for path, (down, up, alpha) in lora_layers.items():
        _check_pair(path, down, up)
        key = kohya_name(path)
        if key + ".lora_down.weight" in out:
            raise LoraFormatError(f"two modules map to the same kohya name {key!r}")
        out[key + ".lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        out[key + ".lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        out[key + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def _check_pair(name: str, down: torch.Tensor, up: torch.Tensor):
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoraFormatError(f"{name}: bad LoRA shapes down {tuple(down.shape)}, up {tuple(up.shape)}")
    if up.shape[1] != down.shape[0]:
        raise LoraFormatError(
            f"{name}: mismatched ranks: down {tuple(down.shape)} has rank {down.shape[0]}, "
            f"up {tuple(up.shape)} has rank {up.shape[1]}"
        )
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraFormatError(f"{name}: conv lora_up must be (out, r, 1, 1), got {tuple(up.shape)}")


# Module-name components of diffusers' UNet2DConditionModel, to invert "_"-joined kohya names without a model.
_UNET_NAME_PARTS = {
    "down_blocks", "up_blocks", "mid_block", "attentions", "resnets", "transformer_blocks", "attn1", "attn2",
    "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_in",
    "proj_out", "ff", "net", "proj", "norm", "norm1", "norm2", "norm3", "conv1", "conv2", "conv_shortcut",
    "time_emb_proj", "downsamplers", "upsamplers", "conv", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "class_embedding", "encoder_hid_proj",
}


def split_module_name(name: str, vocabulary: set[str]) -> str | None:
    """Longest-match split of an ``_``-joined module name into known components (digits are components), joined
    with dots; None if impossible. Inverts kohya-style names without a model."""
    tokens = name.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for j in range(len(tokens), i, -1):
            cand = "_".join(tokens[i:j])
            if cand in vocabulary or (j == i + 1 and cand.isdigit()):
                parts.append(cand)
                i = j
                break
        else:
            return None
    return ".".join(parts)


def _unet_modules(unet) -> dict[str, torch.nn.Module]:
    """{path: module} of the Linear/Conv layers of ``unet`` a LoRA can target (peft wrappers resolved)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: dict[str, torch.nn.Module] = {}
    tuner_prefixes: list[str] = []
    for name, module in unet.named_modules():
        if any(name.startswith(p) for p in tuner_prefixes):
            continue  # base_layer / lora_A / lora_B inside a peft layer
        if isinstance(module, BaseTunerLayer):
            tuner_prefixes.append(name + ".")
            found[name] = module.get_base_layer()
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)):
            found[name] = module
    return found


def _shape_problem(path: str, module: torch.nn.Module, down: torch.Tensor, up: torch.Tensor) -> str | None:
    w = module.weight
    if down.ndim != w.ndim or up.ndim != w.ndim:
        return f"{path}: LoRA is {down.ndim}-d, module weight {tuple(w.shape)}"
    if down.shape[1] != w.shape[1] or up.shape[0] != w.shape[0] or tuple(down.shape[2:]) != tuple(w.shape[2:]):
        return (
            f"{path}: LoRA down {tuple(down.shape)} / up {tuple(up.shape)} does not fit the module weight "
            f"{tuple(w.shape)}"
        )
    return None


def from_kohya(state_dict: Mapping[str, torch.Tensor], unet=None) -> LoraLayers:
    """Layer dict ``{diffusers module path: (down, up, alpha)}`` of a kohya state dict (tensors as stored).

    kohya names turn ``.`` into ``_``, which is ambiguous (``to_q``, ``transformer_blocks``...). With ``unet``
    the names are matched against its actual modules, and keys matching no module (or with shapes that do not
    fit it) raise :class:`LoraFormatError`; without it a known-vocabulary split of diffusers UNet names is used.
    """
    groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    foreign = []
    for key, tensor in state_dict.items():
        if not key.startswith(KOHYA_PREFIX):
            foreign.append(key)
            continue
        base, _, suffix = key.partition(".")
        groups[base[len(KOHYA_PREFIX):]][suffix] = tensor
    if foreign:
        raise LoraFormatError(
            f"{len(foreign)} keys are not kohya UNet LoRA keys (stepdistill LoRAs are UNet-only): "
            + ", ".join(sorted(foreign)[:8])
        )
    if not groups:
        raise LoraFormatError("no kohya LoRA keys (lora_unet_*.lora_down.weight) in the state dict")

    _validate_kohya_groups(state_dict)

    if unet is not None:
        modules = _unet_modules(unet)
        by_kohya: dict[str, list[str]] = collections.defaultdict(list)
        for path in modules:
            by_kohya[path.replace(".", "_")].append(path)
        unmatched, misfit, ambiguous, paths = [], [], [], {}
        for name in groups:
            cands = by_kohya.get(name, [])
            if not cands:
                unmatched.append(KOHYA_PREFIX + name)
            elif len(cands) > 1:
                ambiguous.append(f"{KOHYA_PREFIX}{name} -> {cands}")
            else:
                paths[name] = cands[0]
                problem = _shape_problem(
                    cands[0], modules[cands[0]], groups[name]["lora_down.weight"], groups[name]["lora_up.weight"]
                )
                if problem:
                    misfit.append(problem)
        if unmatched or misfit or ambiguous:
            lines = []
            if unmatched:
                lines.append(f"{len(unmatched)} name no module: " + ", ".join(sorted(unmatched)[:10])
                             + (" ..." if len(unmatched) > 10 else ""))
            if misfit:
                lines.append(f"{len(misfit)} have the wrong shape: " + "; ".join(sorted(misfit)[:5])
                             + (" ..." if len(misfit) > 5 else ""))
            if ambiguous:
                lines.append("ambiguous: " + "; ".join(ambiguous[:5]))
            raise LoraFormatError(
                f"LoRA keys that do not match the base model ({len(unmatched) + len(misfit) + len(ambiguous)} "
                f"of {len(groups)} layers): " + " | ".join(lines)
                + " -- was this LoRA trained for a different base?"
            )
    else:
        paths = {}
        for name in groups:
            path = split_module_name(name, _UNET_NAME_PARTS)
            if path is None:
                raise LoraFormatError(
                    f"cannot map {KOHYA_PREFIX}{name} to a diffusers UNet module path without the model; "
                    "pass unet= to from_kohya"
                )
            paths[name] = path

    return {
        paths[name]: (parts["lora_down.weight"], parts["lora_up.weight"], float(parts["alpha"].item()))
        for name, parts in groups.items()
    }


# ----------------------------------------------------------------------------------------------- diffusers layout


def to_diffusers(lora_layers: Mapping[str, tuple], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """peft-style ``{path}.lora_A.weight`` / ``lora_B.weight`` dict with the ``alpha / r`` scale folded into B."""
    out = {}
    for path, (down, up, alpha) in lora_layers.items():
        _check_pair(path, down, up)
        r = down.shape[0]
        out[f"{path}.lora_A.weight"] = down.detach().to("cpu", dtype).contiguous()
        out[f"{path}.lora_B.weight"] = (up.detach().float().cpu() * (float(alpha) / r)).to(dtype).contiguous()
    return out


def _pairs_to_layers(state_dict: Mapping[str, torch.Tensor], a: str, b: str, what: str) -> LoraLayers:
    """Group ``<path>.<a>`` / ``<path>.<b>`` pairs into a layer dict with alpha = r (scale 1)."""
    layers = {}
    downs = {k[: -len(a)]: v for k, v in state_dict.items() if k.endswith(a)}
    ups = {k[: -len(b)]: v for k, v in state_dict.items() if k.endswith(b)}
    lonely = sorted(set(downs) ^ set(ups))
    if lonely:
        raise LoraFormatError(f"{what}: LoRA layers with only one of {a}/{b}: " + ", ".join(lonely[:8]))
    for path in downs:
        _check_pair(path, downs[path], ups[path])
        layers[path] = (downs[path], ups[path], float(downs[path].shape[0]))
    return layers


def _legacy_to_layers(state_dict: Mapping[str, torch.Tensor], what: str) -> LoraLayers:
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
    layers = _pairs_to_layers(legacy, ".lora.down.weight", ".lora.up.weight", what)
    layers.update(_pairs_to_layers(ab, ".lora_A.weight", ".lora_B.weight", what))
    return layers


# ----------------------------------------------------------------------------------------------- files


def _metadata_str(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)) or value is None:
        return str(value)
    return json.dumps(value, sort_keys=True)


def build_metadata(
    lora_layers: Mapping[str, tuple],
    *,
    base_model_version: str = "sd_v1",
    title: str = "stepdistill LoRA",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """kohya ``ss_*`` + SAI ``modelspec.*`` header for ``lora_layers`` (all values strings)."""
    if base_model_version not in BASE_MODEL_VERSIONS:
        raise ValueError(f"unknown base_model_version {base_model_version!r}; one of {sorted(BASE_MODEL_VERSIONS)}")
    arch, impl, resolution = BASE_MODEL_VERSIONS[base_model_version]
    ranks = collections.Counter(int(d.shape[0]) for d, _, _ in lora_layers.values())
    alphas = collections.Counter(float(a) for _, _, a in lora_layers.values())
    from . import __version__

    md = {
        "format": "pt",
        "ss_base_model_version": base_model_version,
        "ss_network_module": KOHYA_NETWORK_MODULE,
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": str(alphas.most_common(1)[0][0]),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "stepdistill.version": __version__,
    }
    if len(ranks) > 1 or len(alphas) > 1:
        md["stepdistill.per_layer_rank_alpha"] = "True"  # ss_network_dim/alpha are the most common values
    for key, value in (extra or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings, got {key!r}")
        value = _metadata_str(value)
        if key in _STRUCTURAL_KEYS and value != md[key]:
            raise ValueError(f"metadata[{key!r}]={value!r} contradicts the LoRA tensors ({md[key]!r})")
        md[key] = value
    return md


def _resolve_file(path_or_dir: str | os.PathLike) -> Path:
    p = Path(path_or_dir)
    if p.suffix == ".safetensors":
        return p
    return p / LORA_WEIGHT_NAME


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]):
    """safetensors ``save_file`` to a temp file in the target directory, then ``os.replace`` onto ``path``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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
    path = _resolve_file(path_or_dir)

    if format == "kohya":
        tensors = to_kohya(layers, dtype=dtype)
        md_layers = layers
    elif format == "diffusers":
        from diffusers import StableDiffusionPipeline

        peft_sd = to_diffusers(layers, dtype=dtype)
        md_layers = {p: (d, u, float(d.shape[0])) for p, (d, u, _) in layers.items()}  # alpha now folded in
        captured: dict[str, torch.Tensor] = {}

        def _capture(weights, filename):  # diffusers packs the "unet." prefix; we write the file ourselves
            captured.update(weights)

        StableDiffusionPipeline.save_lora_weights(
            str(path.parent), unet_lora_layers=peft_sd, weight_name=path.name, save_function=_capture,
            safe_serialization=True,
        )
        if len(captured) != len(peft_sd) or not all(k.startswith("unet.") for k in captured):
            raise RuntimeError("diffusers' save_lora_weights did not produce the expected unet.* keys")
        tensors = {k: v.contiguous() for k, v in captured.items()}
    else:
        raise ValueError(f"format must be 'kohya' or 'diffusers', got {format!r}")

    md = build_metadata(
        md_layers,
        base_model_version=base_model_version,
        title=title or (path.parent.name if path.name == LORA_WEIGHT_NAME else path.stem) or "stepdistill LoRA",
        extra=metadata,
    )
    _atomic_save_file(tensors, path, md)
    return path


_LEGACY_SUFFIXES = (".lora.down.weight", ".lora.up.weight", "_lora.down.weight", "_lora.up.weight")


def _detect_format(keys: list[str]) -> str:
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
    from safetensors import SafetensorError, safe_open

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
    fmt = _detect_format(keys)
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
            _validate_kohya_groups(state_dict)
        elif fmt in ("diffusers", "peft"):
            _pairs_to_layers(state_dict, ".lora_A.weight", ".lora_B.weight", str(p))
            others = [k for k in keys if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
            if others:
                raise LoraFormatError(f"unsupported entries (plain LoRA only): {', '.join(others[:8])}")
        else:
            _legacy_to_layers({re.sub(r"^unet\.", "", k): v for k, v in state_dict.items()}, str(p))
    except LoraFormatError as e:
        raise LoraFormatError(f"{p}: malformed {fmt} LoRA: {e}") from None
    return state_dict, metadata, fmt


def _validate_kohya_groups(state_dict: Mapping[str, torch.Tensor]):
    groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, tensor in state_dict.items():
        base, _, suffix = key.partition(".")
        groups[base][suffix] = tensor
    for name, parts in groups.items():
        missing = [s for s in ("lora_down.weight", "lora_up.weight", "alpha") if s not in parts]
        extra = sorted(set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"})
        if missing:
            raise LoraFormatError(f"{name}: missing {', '.join(missing)}")
        if extra:
            raise LoraFormatError(f"{name}: unsupported entries {', '.join(extra)} (plain LoRA only)")
        _check_pair(name, parts["lora_down.weight"], parts["lora_up.weight"])
        if parts["alpha"].numel() != 1:
            raise LoraFormatError(f"{name}.alpha must be a scalar, got shape {tuple(parts['alpha'].shape)}")


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
        layers = _pairs_to_layers(sd, ".lora_A.weight", ".lora_B.weight", "diffusers LoRA")
    elif format == "peft":
        sd = {re.sub(r"^(unet\.)?base_model\.model\.", "", k): v for k, v in state_dict.items()}
        layers = _pairs_to_layers(sd, ".lora_A.weight", ".lora_B.weight", "peft LoRA")
    elif format == "diffusers_legacy":
        non_unet = [k for k in state_dict if not k.startswith("unet.")]
        if non_unet:
            raise LoraFormatError(f"non-UNet LoRA keys are not supported: {', '.join(sorted(non_unet)[:5])}")
        layers = _legacy_to_layers({k[len("unet."):]: v for k, v in state_dict.items()}, "legacy diffusers LoRA")
    else:
        raise ValueError(f"unknown LoRA format {format!r}")
    if unet is not None:
        modules = _unet_modules(unet)
        bad = [p for p in layers if p not in modules]
        bad += [s for p, (d, u, _) in layers.items() if p in modules and (s := _shape_problem(p, modules[p], d, u))]
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


# ----------------------------------------------------------------------------------------------- verification


@dataclass
class LoraLoadReport:
    """Layer-by-layer comparison of a loaded adapter with the trained layers."""

    adapter_name: str
    expected: int
    loaded: int
    dropped: list[str] = field(default_factory=list)  # expected layers without the adapter in the UNet
    mismatched: list[tuple[str, float]] = field(default_factory=list)  # (path, relative error of delta W)
    unexpected: list[str] = field(default_factory=list)  # adapter layers nobody trained
    max_rel_err: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.dropped or self.mismatched or self.unexpected)

    def summary(self) -> str:
        s = (
            f"adapter {self.adapter_name!r}: {self.loaded}/{self.expected} layers loaded, "
            f"max relative delta error {self.max_rel_err:.2e}"
        )
        if self.dropped:
            more = " ..." if len(self.dropped) > 10 else ""
            s += f"; {len(self.dropped)} DROPPED: " + ", ".join(self.dropped[:10]) + more
        if self.mismatched:
            s += f"; {len(self.mismatched)} MISMATCHED: " + ", ".join(
                f"{p} (rel err {e:.2e})" for p, e in self.mismatched[:10]
            ) + (" ..." if len(self.mismatched) > 10 else "")
        if self.unexpected:
            s += f"; {len(self.unexpected)} UNEXPECTED: " + ", ".join(self.unexpected[:10])
        return s


def verify_lora_loaded(
    pipe,
    expected_layers: Mapping[str, tuple] | str | os.PathLike,
    adapter_name: str,
    *,
    rtol: float = 1e-2,
    atol: float = 1e-6,
    raise_on_error: bool = True,
) -> LoraLoadReport:
    """Compare the adapter ``pipe.unet`` (or ``pipe.transformer``; or ``pipe`` itself, a model) holds after
    ``load_lora_weights`` with the trained layers.

    Every expected layer must carry the adapter, with effective delta ``scale * B @ A`` (intrinsic scale
    ``lora_alpha / r``, so ``set_adapters`` weights do not matter) equal to ``alpha / r * up @ down`` within
    ``max|diff| <= rtol * max|expected| + atol`` (fp16 storage gives ~1e-3). ``expected_layers`` may be a layer
    dict or a LoRA file. Raises :class:`LoraLoadError` listing dropped / mismatched / unexpected layers.
    """
    unet = denoiser_of(pipe)
    if not isinstance(expected_layers, Mapping):
        expected_layers = read_lora_layers(expected_layers, unet)
    loaded = _lora_modules(unet, adapter_name)
    report = LoraLoadReport(adapter_name=adapter_name, expected=len(expected_layers), loaded=0)
    for path, (down, up, alpha) in sorted(expected_layers.items()):
        module = loaded.get(path)
        if module is None:
            report.dropped.append(path)
            continue
        report.loaded += 1
        want = lora_delta(down, up, alpha)
        with torch.no_grad():
            A = module.lora_A[adapter_name].weight
            B = module.lora_B[adapter_name].weight
            got = _intrinsic_scale(module, adapter_name) * (B.float().flatten(1) @ A.float().flatten(1)).cpu()
        if got.shape != want.shape:
            report.mismatched.append((path, float("inf")))
            report.max_rel_err = float("inf")
            continue
        scale = want.abs().max().item()
        err = (got - want).abs().max().item()
        rel = err / scale if scale > 0 else (0.0 if err <= atol else float("inf"))
        report.max_rel_err = max(report.max_rel_err, rel)
        if err > rtol * scale + atol:
            report.mismatched.append((path, rel))
    report.unexpected = sorted(set(loaded) - set(expected_layers))
    if raise_on_error and not report.ok:
        raise LoraLoadError("LoRA did not load intact: " + report.summary(), report)
    return report
