"""Which tools apply which LoRA layout, as measured by running each tool's own loading code on an SD-1.5-shaped
model with stepdistill's files (278 LoRA layers; issue 14's table, repeated in ``docs/using-adapters.md``)."""
from __future__ import annotations

TOOLS = ("diffusers", "ComfyUI", "A1111", "kohya sd-scripts")

# layout -> tool -> what that tool's loader applies
TOOL_SUPPORT: dict[str, dict[str, str]] = {
    "kohya": {tool: "all layers" for tool in TOOLS},
    "diffusers": {
        "diffusers": "all layers",
        "ComfyUI": "150/278 layers: drops every attention projection (warns)",
        "A1111": "no layer, silently",
        "kohya sd-scripts": "no layer, silently",
    },
    "comfy-flow": {"diffusers": "all layers", "ComfyUI": "all layers (SD3 / FLUX)",
                   "A1111": "not a UNet LoRA", "kohya sd-scripts": "not a UNet LoRA"},
}

DIFFUSERS_LAYOUT_NOTE = ("note: A1111 and kohya sd-scripts apply none of a diffusers-layout LoRA's layers (silently) "
                         "and ComfyUI drops its attention projections; the kohya layout (the default) loads fully in "
                         "diffusers, ComfyUI, A1111 and kohya")


def loads_fully_in(layout: str) -> list[str]:
    """The tools that apply every layer of a file in ``layout`` (empty when not measured)."""
    return [tool for tool, how in TOOL_SUPPORT.get(layout, {}).items() if how.startswith("all layers")]
