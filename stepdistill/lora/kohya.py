"""kohya-ss' LoRA layout -- the default stepdistill writes, and the one diffusers, ComfyUI/Forge, A1111 and kohya's
scripts all read (the published LCM-LoRA files use it too)::

    lora_unet_<diffusers module path, "." -> "_">.lora_down.weight   (r, in) | conv: (r, in, kh, kw)
    lora_unet_<diffusers module path, "." -> "_">.lora_up.weight     (out, r) | conv: (out, r, 1, 1)
    lora_unet_<diffusers module path, "." -> "_">.alpha              0-dim tensor

UNet only, effective update ``delta W = alpha / r * up @ down``. diffusers loads these files (compared layer by
layer in the tests); ComfyUI (``comfy/lora.py: model_lora_keys_unet``) maps ``lora_unet_<path with _>`` keys for
every UNet weight, and A1111 (``convert_diffusers_name_to_compvis``) maps them too -- both read in their
source, not run here. ComfyUI maps diffusers-style UNet keys only as ``unet.<path>`` with ``.to_`` rewritten to
``.processor.to_`` (the pre-peft attention-processor names), so the attention layers of a peft-style
``unet....attn1.to_q.lora_A.weight`` file are reported "lora key not loaded": one more reason for this layout.

For SDXL, kohya's own trainer writes sgm (``input_blocks``) names; diffusers and ComfyUI also map the
diffusers-path names written here, A1111 was not checked.

Turning ``.`` into ``_`` is ambiguous (``to_q``, ``transformer_blocks``...): names are inverted against the base
model's modules when it is given, otherwise by a known-vocabulary split (:func:`split_module_name`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import LoraFormatError
from .layers import LoraLayers, check_pair, lora_targetable_modules, shape_problem, underscored_names

KOHYA_PREFIX = "lora_unet_"
KOHYA_NETWORK_MODULE = "networks.lora"
KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")

# Module-name components of diffusers' UNet2DConditionModel, to invert "_"-joined kohya names without a model.
_UNET_NAME_PARTS = {
    "down_blocks", "up_blocks", "mid_block", "attentions", "resnets", "transformer_blocks", "attn1", "attn2",
    "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_in",
    "proj_out", "ff", "net", "proj", "norm", "norm1", "norm2", "norm3", "conv1", "conv2", "conv_shortcut",
    "time_emb_proj", "downsamplers", "upsamplers", "conv", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "class_embedding", "encoder_hid_proj",
}


def kohya_name(module_path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return KOHYA_PREFIX + module_path.replace(".", "_")


def to_kohya(lora_layers: Mapping[str, tuple], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Flat kohya state dict (``lora_down`` / ``lora_up`` / 0-dim ``alpha``, all in ``dtype``) of a layer dict."""
    return kohya_style_tensors(lora_layers, KOHYA_PREFIX, dtype, name_kind="kohya name")


def kohya_style_tensors(lora_layers: Mapping[str, tuple], prefix: str, dtype: torch.dtype,
                        name_kind: str = "name") -> dict[str, torch.Tensor]:
    """``<prefix><path with _>.lora_down.weight / .lora_up.weight / .alpha`` tensors (kohya's scheme; onetrainer
    uses it with ``lora_transformer_``) of a layer dict, all in ``dtype`` on the CPU (copies: layers that share
    a tensor still write)."""
    out: dict[str, torch.Tensor] = {}
    for path, (down, up, alpha) in lora_layers.items():
        check_pair(path, down, up)
        key = prefix + path.replace(".", "_")
        if key + ".lora_down.weight" in out:
            raise LoraFormatError(f"two modules map to the same {name_kind} {key!r}")
        out[key + ".lora_down.weight"] = down.detach().to("cpu", dtype).clone().contiguous()
        out[key + ".lora_up.weight"] = up.detach().to("cpu", dtype).clone().contiguous()
        out[key + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def group_by_layer(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, dict[str, torch.Tensor]]:
    """``{name: {suffix: tensor}}`` of ``<prefix><name>.<suffix>`` keys (kohya-style: one group per layer)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        base, _, suffix = key.partition(".")
        groups.setdefault(base[len(prefix):], {})[suffix] = tensor
    return groups


def check_kohya_groups(groups: Mapping[str, Mapping[str, torch.Tensor]], prefix: str = ""):
    """Each group must hold exactly ``lora_down.weight``, ``lora_up.weight`` (a valid pair) and a scalar ``alpha``;
    errors name the layer as ``<prefix><name>``."""
    for name, parts in groups.items():
        name = prefix + name
        missing = [s for s in KOHYA_PARTS if s not in parts]
        extra = sorted(set(parts) - set(KOHYA_PARTS))
        if missing:
            raise LoraFormatError(f"{name}: missing {', '.join(missing)}")
        if extra:
            raise LoraFormatError(f"{name}: unsupported entries {', '.join(extra)} (plain LoRA only)")
        check_pair(name, parts["lora_down.weight"], parts["lora_up.weight"])
        if parts["alpha"].numel() != 1:
            raise LoraFormatError(f"{name}.alpha must be a scalar, got shape {tuple(parts['alpha'].shape)}")


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


def group_layers(groups: Mapping[str, Mapping[str, torch.Tensor]], paths: Mapping[str, str]) -> LoraLayers:
    """Layer dict of checked kohya-style groups, ``paths`` mapping each group name to its module path."""
    return {
        paths[name]: (parts["lora_down.weight"], parts["lora_up.weight"], float(parts["alpha"].item()))
        for name, parts in groups.items()
    }


def from_kohya(state_dict: Mapping[str, torch.Tensor], unet=None) -> LoraLayers:
    """Layer dict ``{diffusers module path: (down, up, alpha)}`` of a kohya state dict (tensors as stored).

    kohya names turn ``.`` into ``_``, which is ambiguous (``to_q``, ``transformer_blocks``...). With ``unet``
    the names are matched against its actual modules, and keys matching no module (or with shapes that do not
    fit it) raise :class:`LoraFormatError`; without it a known-vocabulary split of diffusers UNet names is used.
    """
    foreign = [key for key in state_dict if not key.startswith(KOHYA_PREFIX)]
    if foreign:
        raise LoraFormatError(
            f"{len(foreign)} keys are not kohya UNet LoRA keys (stepdistill LoRAs are UNet-only): "
            + ", ".join(sorted(foreign)[:8])
        )
    groups = group_by_layer(state_dict, KOHYA_PREFIX)
    if not groups:
        raise LoraFormatError("no kohya LoRA keys (lora_unet_*.lora_down.weight) in the state dict")
    check_kohya_groups(groups, KOHYA_PREFIX)
    paths = _match_model(groups, unet) if unet is not None else _split_names(groups)
    return group_layers(groups, paths)


def _split_names(groups) -> dict[str, str]:
    paths = {}
    for name in groups:
        path = split_module_name(name, _UNET_NAME_PARTS)
        if path is None:
            raise LoraFormatError(
                f"cannot map {KOHYA_PREFIX}{name} to a diffusers UNet module path without the model; "
                "pass unet= to from_kohya"
            )
        paths[name] = path
    return paths


def _match_model(groups, unet) -> dict[str, str]:
    """Group name -> the one module path of ``unet`` it names; every misfit reported at once."""
    modules = lora_targetable_modules(unet)
    by_kohya = underscored_names(modules)
    unmatched, misfit, ambiguous, paths = [], [], [], {}
    for name in groups:
        cands = by_kohya.get(name, [])
        if not cands:
            unmatched.append(KOHYA_PREFIX + name)
        elif len(cands) > 1:
            ambiguous.append(f"{KOHYA_PREFIX}{name} -> {cands}")
        else:
            paths[name] = cands[0]
            problem = shape_problem(
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
    return paths
