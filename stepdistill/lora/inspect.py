"""Describing a LoRA file (``stepdistill inspect``): its format, base family (and where that came from), ranks,
modules, alpha, dtype, size and the stepdistill model card; a malformed file raises :class:`LoraFormatError`
with a clear message (the CLI exits with code 2)."""
from __future__ import annotations

import collections
import os
from collections.abc import Mapping
from typing import Any

from ..models.family import LCM_LORA_TARGET_MODULES
from ..models.pipeline import resolve_component
from .base_model_tags import FLOW_FAMILIES, family_display_name, infer_family
from .diffusers_layout import FOLDED_ALPHA_KEY
from .export import read_adapter
from .flow_formats import comfy_unmapped
from .metadata import stepdistill_metadata
from .tools import TOOL_SUPPORT, loads_fully_in

# Module types reported by inspect (longest matching suffix wins).
_MODULE_TYPES = sorted(
    set(LCM_LORA_TARGET_MODULES)
    | {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.net.0.proj", "ff_context.net.2",
       "proj_mlp", "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",
       "context_embedder", "pos_embed.proj", "linear_1", "linear_2", "conv_in", "conv_out"},
    key=len, reverse=True,
)


def module_type(path: str) -> str:
    """The module type of a path (``to_q``, ``ff.net.0.proj``, ``conv1``...): its longest known suffix."""
    for t in _MODULE_TYPES:
        if path == t or path.endswith("." + t):
            return t
    return path.rsplit(".", 1)[-1]


def inspect_lora(path: str | os.PathLike, base=None) -> dict[str, Any]:
    """A JSON-able description of a LoRA file; raises :class:`LoraFormatError` for malformed files."""
    model = resolve_component(base)
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
        "base_family_name": family_display_name(family),
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
        "loads_fully_in": loads_fully_in(adapter.format),
        "tool_support": TOOL_SUPPORT.get(adapter.format, {}),
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
    """The text ``stepdistill inspect`` prints for :func:`inspect_lora`'s description."""
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
        "loads fully " + (", ".join(info["loads_fully_in"]) or "not measured for this layout")
        + "".join(f"\n            {tool}: {how}" for tool, how in info["tool_support"].items()
                  if not how.startswith("all layers")),
    ]
    if info.get("title"):
        lines.append(f"title       {info['title']}")
    lines += _card_lines(info["stepdistill"])
    if info.get("comfyui_unmapped_modules"):
        lines.append(f"WARNING     {len(info['comfyui_unmapped_modules'])} modules ComfyUI does not map: "
                     + ", ".join(info["comfyui_unmapped_modules"][:6]))
    return "\n".join(lines)


def _card_lines(sd: Mapping[str, str]) -> list[str]:
    """The stepdistill model card part of :func:`format_inspection`."""
    if not sd:
        return ["stepdistill (no stepdistill metadata: a foreign LoRA)"]
    rec = []
    if "scheduler" in sd:
        rec.append(f"scheduler {sd['scheduler']}")
    if "recommended_steps" in sd:
        rec.append(f"{sd['recommended_steps']} steps")
    if "recommended_guidance" in sd:
        rec.append(f"guidance {sd['recommended_guidance']}")
    if "num_windows" in sd:
        rec.append(f"{sd['num_windows']} windows")
    method = sd.get("method", "?")
    lines = [f"stepdistill method {method}" + (f" ({sd['method_name']})" if "method_name" in sd else "")]
    if rec:
        lines.append("            recommended: " + ", ".join(rec))
    for k in ("base_model", "train_steps", "version"):
        if k in sd:
            lines.append(f"            {k}: {sd[k]}")
    return lines
