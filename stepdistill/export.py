"""Portability of adapters: convert a LoRA between layouts (``stepdistill export``) and describe one
(``stepdistill inspect``).

The tensor/metadata layer is :mod:`stepdistill.lora_io` (kohya and diffusers layouts for UNet LoRAs, the
``ss_*``/``modelspec.*`` header, layer-by-layer load verification); this module adds

* format conversion of whole files, keeping the ``stepdistill.*`` metadata (method, recommended
  sampler/steps/guidance) and making the ``diffusers`` round trip exact (see *alpha folding* below);
* transformer (flow-matching: SD3 / FLUX.1) LoRAs, in the key layout ComfyUI maps for diffusers-trained
  LoRAs (``--format comfy-flow``);
* an inspector that names the format, the base family, ranks, modules, alpha, dtype, size and the
  stepdistill metadata, and rejects malformed files with a clear message (exit code 2).

Formats written by :func:`write_adapter`
-----------------------------------------
``kohya`` (UNet LoRAs)
    ``lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha`` -- :func:`lora_io.to_kohya`. Loads
    in diffusers (tested), ComfyUI, A1111/Forge (mapping read in their source, see ``lora_io``).
``diffusers`` (UNet or transformer LoRAs)
    ``unet.<path>.lora_A.weight / .lora_B.weight`` (``transformer.<path>...`` for transformers), the
    ``alpha / r`` scale folded into ``lora_B`` (no per-layer alpha exists in this layout).
``comfy-flow`` (transformer LoRAs only)
    ``transformer.<path>.lora_A.weight / .lora_B.weight`` with alpha folded into ``lora_B`` -- the
    "regular diffusers SD3 / Flux LoRA format" ComfyUI's ``comfy/lora.py: model_lora_keys_unet`` maps
    (``key_map["transformer.{k}"]`` for ``SD3`` and ``Flux`` models; a LoRA without ``.alpha`` keys is applied
    with scale 1 in ``comfy/weight_adapter/lora.py``), and the layout diffusers' ``SD3LoraLoaderMixin`` /
    ``FluxLoraLoaderMixin`` load (tested on tiny SD3/FLUX transformers). Modules ComfyUI's diffusers->comfy
    tables (``comfy/utils.py: mmdit_to_diffusers`` / ``flux_to_diffusers``) do not list are refused unless
    ``allow_unmapped``. With ``flow_keys="onetrainer"``: ``lora_transformer_<path with _>.lora_down / lora_up /
    alpha`` (ComfyUI maps it as "onetrainer"; diffusers 0.42.1 does NOT load it -- measured: FLUX raises on the
    feed-forward keys, SD3 drops every layer), so it is for ComfyUI only. ComfyUI itself was not run here:
    the mapping was read in its source (comfyanonymous/ComfyUI, ``comfy/lora.py`` at 41444b5 and later).

Alpha folding
-------------
The diffusers layout has no alpha, so ``lora_B`` is written as ``up * alpha / r``. To make
``kohya -> diffusers -> kohya`` give back the original tensors, the original alphas are recorded in the header
(``stepdistill.folded_alpha``: one number, or a JSON object ``{path: alpha}`` when they differ) and
:func:`read_adapter` unfolds them. The round trip is bit-exact when ``alpha / r`` is a power of two (e.g.
alpha = r, 2r, r/2) and exact to the storage dtype's rounding otherwise; the effective update
``alpha / r * up @ down`` is preserved either way.
"""
from __future__ import annotations

import collections
import datetime
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from . import lora_io
from .lora_io import LoraFormatError, LoraLayers

FORMATS = ("kohya", "diffusers", "comfy-flow")
FLOW_KEYS = ("transformer", "onetrainer")
ONETRAINER_PREFIX = "lora_transformer_"
FOLDED_ALPHA_KEY = "stepdistill.folded_alpha"

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
# cross_attention_dim of a UNet (in_features of attn2.to_k) -> family
_CROSS_ATTENTION_FAMILY = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}

# Header keys that describe the tensors or the file layout: regenerated on export, never copied.
_REGENERATED_KEYS = {
    "format", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.resolution",
    "modelspec.date", "stepdistill.version", "stepdistill.per_layer_rank_alpha", FOLDED_ALPHA_KEY,
    "stepdistill.export_source_format",
}
# Older stepdistill files wrote the model card without the "stepdistill." prefix.
_LEGACY_CARD_KEYS = ("method", "method_name", "scheduler", "recommended_steps", "recommended_guidance",
                     "alternative_scheduler", "num_windows", "base_model", "prediction_type", "train_steps")

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

# Module types reported by inspect (longest matching suffix wins).
_MODULE_TYPES = sorted(
    set(lora_io.LCM_LORA_TARGET_MODULES)
    | {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.net.0.proj", "ff_context.net.2",
       "proj_mlp", "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",
       "context_embedder", "pos_embed.proj", "linear_1", "linear_2", "conv_in", "conv_out"},
    key=len, reverse=True,
)


@dataclass
class Adapter:
    """A LoRA in memory: ``layers`` ``{module path: (down, up, alpha)}`` of one component, plus its header."""

    layers: LoraLayers
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = ""           # as read: kohya, diffusers, peft, diffusers_legacy, comfy-flow, onetrainer
    component: str = "unet"    # "unet" or "transformer"
    path: Path | None = None


# ----------------------------------------------------------------------------------------------- reading


def _is_flow_state_dict(keys) -> bool:
    return any(k.startswith(("transformer.", ONETRAINER_PREFIX)) for k in keys)


def _read_flow(state_dict: Mapping[str, torch.Tensor], where: str, model=None) -> tuple[LoraLayers, str]:
    keys = sorted(state_dict)
    foreign = [k for k in keys if not k.startswith(("transformer.", ONETRAINER_PREFIX))]
    if foreign:
        raise LoraFormatError(
            f"{where}: transformer LoRA with non-transformer keys (text-encoder LoRAs are not supported): "
            + ", ".join(foreign[:6]))
    if any(k.startswith(ONETRAINER_PREFIX) for k in keys):
        if any(k.startswith("transformer.") for k in keys):
            raise LoraFormatError(f"{where}: mixes transformer.* and lora_transformer_* keys")
        groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
        for k, v in state_dict.items():
            base, _, suffix = k.partition(".")
            groups[base[len(ONETRAINER_PREFIX):]][suffix] = v
        try:
            lora_io._validate_kohya_groups({ONETRAINER_PREFIX + n + "." + s: v
                                            for n, parts in groups.items() for s, v in parts.items()})
        except LoraFormatError as e:
            raise LoraFormatError(f"{where}: malformed onetrainer-style LoRA: {e}") from None
        by_name: dict[str, list[str]] = collections.defaultdict(list)
        if model is not None:
            for p in lora_io._unet_modules(model):
                by_name[p.replace(".", "_")].append(p)
        layers: LoraLayers = {}
        for name, parts in groups.items():
            if model is not None:
                cands = by_name.get(name, [])
                if len(cands) != 1:
                    raise LoraFormatError(f"{where}: {ONETRAINER_PREFIX}{name} matches {len(cands)} modules of the "
                                          "base model -- was this LoRA trained for a different base?")
                path = cands[0]
            else:
                path = lora_io.split_module_name(name, _TRANSFORMER_NAME_PARTS)
                if path is None:
                    raise LoraFormatError(f"{where}: cannot map {ONETRAINER_PREFIX}{name} to a transformer module "
                                          "path without the model; pass --base")
            layers[path] = (parts["lora_down.weight"], parts["lora_up.weight"], float(parts["alpha"].item()))
        return layers, "onetrainer"

    sd = {k[len("transformer."):]: v for k, v in state_dict.items()}
    alphas = {k[: -len(".alpha")]: v for k, v in sd.items() if k.endswith(".alpha")}
    pairs = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    others = [k for k in pairs if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if others:
        raise LoraFormatError(f"{where}: unsupported entries (plain LoRA only): " + ", ".join(others[:8]))
    try:
        layers = lora_io._pairs_to_layers(pairs, ".lora_A.weight", ".lora_B.weight", where)
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


def _unfold_alpha(layers: LoraLayers, metadata: Mapping[str, str]) -> LoraLayers:
    """Undo the alpha folding of a diffusers-layout file written by :func:`write_adapter`."""
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


def read_adapter(path: str | os.PathLike, base_model=None) -> Adapter:
    """Read a LoRA file in any layout stepdistill knows (UNet: kohya, diffusers, peft, legacy; transformer:
    ``transformer.*`` or ``lora_transformer_*``). ``base_model``: the UNet / transformer (or a pipeline) to match
    kohya names against and check shapes. Malformed files raise :class:`LoraFormatError`."""
    model = _component_model(base_model)
    p, state_dict, metadata = lora_io.open_safetensors(path)
    if not state_dict:
        raise LoraFormatError(f"{p} holds no tensors")
    if _is_flow_state_dict(state_dict):
        layers, fmt = _read_flow(state_dict, str(p), model)
        component = "transformer"
        if model is not None:
            _check_against_model(layers, model, str(p))
    else:
        sd, metadata, fmt = lora_io.read_lora(p)
        try:
            layers = lora_io.lora_layers_from_state_dict(sd, fmt, model)
        except LoraFormatError as e:
            hint = "" if model is not None or "pass unet=" not in str(e) else " (pass --base MODEL to match names)"
            raise LoraFormatError(f"{p}: {e}{hint}") from None
        component = "unet"
    if not layers:
        raise LoraFormatError(f"{p} holds no LoRA layers")
    layers = _unfold_alpha(layers, metadata)
    return Adapter(layers=layers, metadata=metadata, format=fmt, component=component, path=p)


def _component_model(base_model):
    """``base_model`` may be None, a model, a pipeline, or a path / ``"toy"`` (loaded: unet or transformer)."""
    if base_model is None or isinstance(base_model, torch.nn.Module):
        return base_model
    if not isinstance(base_model, (str, os.PathLike)):
        return getattr(base_model, "unet", None) or getattr(base_model, "transformer", None)
    return load_component(str(base_model))


def load_component(model: str):
    """The UNet or transformer of a pipeline directory (or ``"toy"``), loaded alone, float32 on the CPU."""
    from .toy.world import toy_teacher_path

    root = Path(toy_teacher_path() if model == "toy" else model)
    index = root / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{root} is not a diffusers pipeline directory (no model_index.json)")
    entries = json.loads(index.read_text())
    for name in ("unet", "transformer"):
        if name in entries and isinstance(entries[name], list) and entries[name][1]:
            import diffusers

            cls = getattr(diffusers, entries[name][1])
            return cls.from_pretrained(str(root), subfolder=name, torch_dtype=torch.float32)
    raise ValueError(f"{root} has neither a unet nor a transformer component")


def _check_against_model(layers: LoraLayers, model, where: str):
    modules = lora_io._unet_modules(model)
    bad = [p for p in layers if p not in modules]
    bad += [s for p, (d, u, _) in layers.items() if p in modules
            and (s := lora_io._shape_problem(p, modules[p], d, u))]
    if bad:
        raise LoraFormatError(f"{where}: LoRA layers that do not match the base model: "
                              + ", ".join(sorted(bad)[:10]) + " -- was this LoRA trained for a different base?")


# ----------------------------------------------------------------------------------------------- families


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
    if model is not None:
        name = type(model).__name__
        if "Flux" in name:
            return "flux1", f"base model class {name}"
        if "SD3" in name:
            return "sd3", f"base model class {name}"
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
        if dim in _CROSS_ATTENTION_FAMILY:
            return _CROSS_ATTENTION_FAMILY[dim], f"cross-attention width {dim} (attn2.to_k input)"
        if dim == 64:
            return "toy", "cross-attention width 64: the stepdistill toy teacher (SD1-shaped)"
        return f"unknown (cross-attention width {dim})", "attn2.to_k input width"
    return "unknown", "no attn2.to_k layer to read the cross-attention width from"


def _ss_version(family: str) -> str:
    """kohya ``ss_base_model_version`` to write for a UNet family (the toy teacher is SD1-shaped)."""
    return family if family in lora_io.BASE_MODEL_VERSIONS else "sd_v1"


# ----------------------------------------------------------------------------------------------- writing


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
        return ok_flux(p) or ok_sd3(p)

    def ok_flux(p):
        return not comfy_unmapped([p], "flux1")

    def ok_sd3(p):
        return not comfy_unmapped([p], "sd3")

    return sorted(p for p in paths if not ok(p))


def _passthrough_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    out = {k: v for k, v in metadata.items() if k not in _REGENERATED_KEYS}
    for k in _LEGACY_CARD_KEYS:  # old stepdistill files: promote the bare card keys
        if k in out and f"stepdistill.{k}" not in out:
            out[f"stepdistill.{k}"] = out[k]
    return out


def _folded_alpha_value(layers: LoraLayers) -> str | None:
    alphas = {p: float(a) for p, (d, _, a) in layers.items()}
    if all(a == d.shape[0] for p, (d, _, a) in layers.items()):
        return None
    distinct = set(alphas.values())
    return json.dumps(next(iter(distinct)) if len(distinct) == 1 else alphas, sort_keys=True)


def _flow_metadata(layers: LoraLayers, family: str, title: str, extra: Mapping[str, str], folded: bool) -> dict:
    from . import __version__

    ranks = collections.Counter(int(d.shape[0]) for d, _, _ in layers.values())
    alphas = collections.Counter(float(d.shape[0] if folded else a) for d, _, a in layers.values())
    arch = FLOW_FAMILIES.get(family, ("unknown",))[0]
    md = {
        "format": "pt",
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": str(alphas.most_common(1)[0][0]),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "stepdistill.version": __version__,
    }
    if family in FLOW_FAMILIES:
        md["ss_base_model_version"] = family
    md.update(extra)
    return md


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
        lora_io._check_pair(p, d, u)
    dtype = dtype or next(iter(layers.values()))[0].dtype
    path = lora_io._resolve_file(out)
    extra = _passthrough_metadata(base_md)
    extra.update({k: lora_io._metadata_str(v) for k, v in (metadata or {}).items()})
    if isinstance(adapter, Adapter) and adapter.format:
        extra["stepdistill.export_source_format"] = adapter.format
    title = title or extra.pop("modelspec.title", None) or (
        path.parent.name if path.name == lora_io.LORA_WEIGHT_NAME else path.stem) or "stepdistill LoRA"
    family = family or infer_family(layers, component, base_md)[0]

    if component == "unet":
        if format == "comfy-flow":
            raise ValueError("comfy-flow is the layout for transformer (SD3/FLUX) LoRAs; this is a UNet LoRA -- "
                             "use --format kohya (ComfyUI, A1111/Forge and diffusers all map lora_unet_* keys)")
        if format == "diffusers":
            folded = _folded_alpha_value(layers)
            if folded is not None:
                extra[FOLDED_ALPHA_KEY] = folded
        return lora_io.save_lora(path, layers, format=format, base_model_version=_ss_version(family),
                                 metadata=extra, dtype=dtype, title=title)

    if component != "transformer":
        raise ValueError(f"component must be 'unet' or 'transformer', got {component!r}")
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
    tensors: dict[str, torch.Tensor] = {}
    onetrainer = format == "comfy-flow" and flow_keys == "onetrainer"
    for p, (down, up, alpha) in sorted(layers.items()):
        r = down.shape[0]
        if onetrainer:
            key = ONETRAINER_PREFIX + p.replace(".", "_")
            if key + ".lora_down.weight" in tensors:
                raise LoraFormatError(f"two modules map to the same name {key!r}")
            tensors[key + ".lora_down.weight"] = down.detach().to("cpu", dtype).clone().contiguous()
            tensors[key + ".lora_up.weight"] = up.detach().to("cpu", dtype).clone().contiguous()
            tensors[key + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)
        else:
            tensors[f"transformer.{p}.lora_A.weight"] = down.detach().to("cpu", dtype).clone().contiguous()
            tensors[f"transformer.{p}.lora_B.weight"] = (
                up.detach().double().cpu() * (float(alpha) / r)).to(dtype).contiguous()
    if not onetrainer:
        folded = _folded_alpha_value(layers)
        if folded is not None:
            extra[FOLDED_ALPHA_KEY] = folded
    md = _flow_metadata(layers, family, title, extra, folded=not onetrainer)
    lora_io._atomic_save_file(tensors, path, md)
    return path


def export_lora(src, dst, format: str, base=None, dtype: torch.dtype | None = None, title: str | None = None,
                flow_keys: str = "transformer", allow_unmapped: bool = False,
                family: str | None = None) -> tuple[Path, Adapter]:
    """Read ``src`` (any supported layout), write it to ``dst`` in ``format``; returns (path, adapter read).
    ``family`` overrides the base family (otherwise: ``base``'s, the header's, or inferred from key names)."""
    model = _component_model(base)
    adapter = read_adapter(src, model)
    if family is None:
        family = infer_family(adapter.layers, adapter.component, adapter.metadata, model)[0]
        if model is not None and adapter.component == "unet":
            family = _unet_model_family(model)
    path = write_adapter(adapter, dst, format, family=family, dtype=dtype, title=title, flow_keys=flow_keys,
                         allow_unmapped=allow_unmapped)
    return path, adapter


def _unet_model_family(unet) -> str:
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl_base_v1-0"
    dim = getattr(unet.config, "cross_attention_dim", 768)
    return _CROSS_ATTENTION_FAMILY.get(int(dim) if isinstance(dim, int) else 768, "sd_v1")


# ----------------------------------------------------------------------------------------------- inspect


def module_type(path: str) -> str:
    for t in _MODULE_TYPES:
        if path == t or path.endswith("." + t):
            return t
    return path.rsplit(".", 1)[-1]


def stepdistill_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    out = {k[len("stepdistill."):]: v for k, v in metadata.items() if k.startswith("stepdistill.")}
    for k in _LEGACY_CARD_KEYS:
        if k in metadata and k not in out:
            out[k] = metadata[k]
    return out


def inspect_lora(path: str | os.PathLike, base=None) -> dict[str, Any]:
    """A JSON-able description of a LoRA file; raises :class:`LoraFormatError` for malformed files."""
    model = _component_model(base)
    adapter = read_adapter(path, model)
    layers, md = adapter.layers, adapter.metadata
    family, how = infer_family(layers, adapter.component, md, model)
    ranks = collections.Counter(int(d.shape[0]) for d, _, _ in layers.values())
    alphas = collections.Counter(float(a) for _, _, a in layers.values())
    dtypes = collections.Counter(str(d.dtype).replace("torch.", "") for d, _, _ in layers.values())
    types = collections.Counter(module_type(p) for p in layers)
    kinds = collections.Counter("conv" if d.ndim == 4 else "linear" for d, _, _ in layers.values())
    n_params = sum(d.numel() + u.numel() for d, u, _ in layers.values())
    scale = collections.Counter(round(float(a) / d.shape[0], 6) for d, _, a in layers.values())
    info = {
        "file": str(adapter.path),
        "size_bytes": adapter.path.stat().st_size,
        "format": adapter.format,
        "component": adapter.component,
        "base_family": family,
        "base_family_name": UNET_FAMILY_NAMES.get(family) or FLOW_FAMILIES.get(family, (None, None))[1] or family,
        "base_family_source": how,
        "modules": len(layers),
        "module_kinds": dict(sorted(kinds.items())),
        "module_types": dict(sorted(types.items())),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {str(k): v for k, v in sorted(alphas.items())},
        "scales_alpha_over_rank": {str(k): v for k, v in sorted(scale.items())},
        "alpha_folded": FOLDED_ALPHA_KEY in md or adapter.format in ("diffusers", "peft", "comfy-flow")
        and all(a == d.shape[0] for d, _, a in layers.values()),
        "dtypes": dict(dtypes),
        "parameters": n_params,
        "title": md.get("modelspec.title", ""),
        "stepdistill": stepdistill_metadata(md),
        "metadata_keys": len(md),
    }
    if how.startswith("metadata"):
        shape_family, shape_how = infer_family(layers, adapter.component, {}, model)
        if shape_family != family:
            info["shape_family"], info["shape_family_source"] = shape_family, shape_how
    if adapter.component == "transformer":
        fam = family if family in FLOW_FAMILIES else "unknown"
        info["comfyui_unmapped_modules"] = comfy_unmapped(layers, fam)
    return info


def format_inspection(info: Mapping[str, Any]) -> str:
    def counts(d):
        return ", ".join(f"{k} x{v}" for k, v in d.items()) if len(d) > 1 else ", ".join(map(str, d))

    lines = [
        f"file        {info['file']} ({info['size_bytes'] / 1024:.1f} KiB, {info['parameters']:,} parameters)",
        f"format      {info['format']} ({info['component']} LoRA)",
        f"base        {info['base_family_name']} [{info['base_family']}; from {info['base_family_source']}]"
        + (f"\n            shapes say: {info['shape_family']} ({info['shape_family_source']})"
           if "shape_family" in info else ""),
        f"modules     {info['modules']} ({', '.join(f'{v} {k}' for k, v in info['module_kinds'].items())})",
        "types       " + ", ".join(f"{k} x{v}" for k, v in info["module_types"].items()),
        f"rank        {counts(info['ranks'])}",
        f"alpha       {counts(info['alphas'])} (scale alpha/rank: {counts(info['scales_alpha_over_rank'])}"
        + ("; folded into lora_B" if info["alpha_folded"] else "") + ")",
        f"dtype       {counts(info['dtypes'])}",
    ]
    if info.get("title"):
        lines.append(f"title       {info['title']}")
    sd = info["stepdistill"]
    if sd:
        method = sd.get("method", "?")
        rec = []
        if "scheduler" in sd:
            rec.append(f"scheduler {sd['scheduler']}")
        if "recommended_steps" in sd:
            rec.append(f"{sd['recommended_steps']} steps")
        if "recommended_guidance" in sd:
            rec.append(f"guidance {sd['recommended_guidance']}")
        if "num_windows" in sd:
            rec.append(f"{sd['num_windows']} windows")
        lines.append(f"stepdistill method {method}" + (f" ({sd['method_name']})" if "method_name" in sd else ""))
        if rec:
            lines.append("            recommended: " + ", ".join(rec))
        for k in ("base_model", "train_steps", "version"):
            if k in sd:
                lines.append(f"            {k}: {sd[k]}")
    else:
        lines.append("stepdistill (no stepdistill metadata: a foreign LoRA)")
    if info.get("comfyui_unmapped_modules"):
        lines.append(f"WARNING     {len(info['comfyui_unmapped_modules'])} modules ComfyUI does not map: "
                     + ", ".join(info["comfyui_unmapped_modules"][:6]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI

_DTYPES = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _fail(message: str) -> SystemExit:
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def cmd_export(args):
    try:
        path, adapter = export_lora(args.input, args.output, args.format, base=args.base, dtype=_DTYPES[args.dtype],
                                    title=args.title, flow_keys=args.flow_keys, allow_unmapped=args.allow_unmapped,
                                    family=args.family)
    except (LoraFormatError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    print(f"wrote {path}: {len(adapter.layers)} {adapter.component} layers, {adapter.format} -> {args.format}"
          + (f" ({args.flow_keys} keys)" if args.format == "comfy-flow" else ""))


def cmd_inspect(args):
    try:
        info = inspect_lora(args.file, base=args.base)
    except (LoraFormatError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    print(json.dumps(info, indent=1) if args.json else format_inspection(info))


def add_portability_commands(subparsers):
    """Register ``export``, ``inspect`` (here) and ``train-style`` / ``stack-eval`` (:mod:`stepdistill.stacking`)."""
    e = subparsers.add_parser("export", help="convert a LoRA between kohya, diffusers and ComfyUI flow layouts")
    e.add_argument("input", help="LoRA file (.safetensors) or a directory holding pytorch_lora_weights.safetensors")
    e.add_argument("output", help="output .safetensors file, or a directory (gets pytorch_lora_weights.safetensors)")
    e.add_argument("--format", required=True, choices=FORMATS,
                   help="kohya: lora_unet_* (UNet; diffusers/ComfyUI/A1111); diffusers: unet.*/transformer.* "
                        "lora_A/B; comfy-flow: transformer.* for SD3/FLUX in ComfyUI and diffusers")
    e.add_argument("--base", default=None, help="pipeline directory or 'toy': match names and shapes against it")
    e.add_argument("--dtype", default="keep", choices=sorted(_DTYPES), help="storage dtype (default: keep)")
    e.add_argument("--title", default=None, help="modelspec.title of the output")
    e.add_argument("--family", default=None, choices=sorted(FLOW_FAMILIES),
                   help="transformer LoRAs: the base family when neither metadata nor --base tells")
    e.add_argument("--flow-keys", default="transformer", choices=FLOW_KEYS,
                   help="comfy-flow key names: transformer.* (ComfyUI + diffusers) or lora_transformer_* "
                        "(onetrainer style; ComfyUI only)")
    e.add_argument("--allow-unmapped", action="store_true",
                   help="comfy-flow: write layers ComfyUI does not map instead of refusing")
    e.set_defaults(func=cmd_export)

    i = subparsers.add_parser("inspect", help="describe a LoRA file: format, base family, ranks, modules, metadata")
    i.add_argument("file")
    i.add_argument("--base", default=None, help="pipeline directory or 'toy' to check the LoRA against")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=cmd_inspect)

    from .stacking import add_stacking_commands

    add_stacking_commands(subparsers)
