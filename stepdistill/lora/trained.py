"""Writing what training produced: the trained adapter of a UNet or of an SD3 / FLUX transformer, in the layout
its base family's tools load."""
from __future__ import annotations

import sys
import warnings

import torch

from .base_model_tags import FLOW_FAMILIES
from .export import write_adapter
from .flow_formats import comfy_unmapped
from .peft_adapter import unet_lora_state_dict
from .save import save_lora
from .tools import DIFFUSERS_LAYOUT_NOTE


def save_trained_adapter(out, model, family_tag: str, metadata: dict, title: str, format: str = "kohya",
                         state: dict | None = None):
    """Write the trained adapter of ``model`` as ``out/pytorch_lora_weights.safetensors`` (fp16); returns the path.

    ``family_tag``: the base-model tag (``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``, ``sd3``, ``flux1``).
    UNets: kohya's ``lora_unet_*`` layout (:func:`stepdistill.lora.save_lora`; ``format="diffusers"``: ``unet.*``).
    SD3 / FLUX transformers: ``transformer.<path>.lora_A/B.weight`` with alpha folded into ``lora_B``
    (:func:`stepdistill.lora.write_adapter`, ``comfy-flow``). Why that layout: it is the one stock diffusers'
    ``StableDiffusion3Pipeline`` / ``FluxPipeline.load_lora_weights`` load with every layer (tested layer by
    layer) and the one ComfyUI maps for SD3 / FLUX as "regular diffusers" LoRAs (``transformer.{k}``); kohya's
    ``lora_unet_`` names do not exist for transformers, and the onetrainer ``lora_transformer_`` keys are
    refused or dropped by diffusers 0.42.1. Layers ComfyUI does not map (custom targets) are written with a
    warning. ``state``: the adapter's tensors by peft name, when the model's own are sharded (FSDP / DeepSpeed)."""
    if state is not None:
        model = unet_lora_state_dict(model, state_dict=state)  # a layer dict: save_lora and write_adapter take it
    if family_tag not in FLOW_FAMILIES:
        if format == "diffusers":
            print(DIFFUSERS_LAYOUT_NOTE, file=sys.stderr)
        return save_lora(out, model, format=format, base_model_version=family_tag, metadata=metadata, title=title)
    layers = model if isinstance(model, dict) else unet_lora_state_dict(model)
    unmapped = comfy_unmapped(layers, family_tag)
    if unmapped:
        warnings.warn(f"{len(unmapped)} LoRA layers are modules ComfyUI does not map for {family_tag} (it will skip "
                      f"them; diffusers loads them): {', '.join(unmapped[:6])}", UserWarning, stacklevel=2)
    return write_adapter(layers, out, "comfy-flow" if format == "kohya" else "diffusers",
                         component="transformer", family=family_tag, metadata=metadata, dtype=torch.float16,
                         title=title, allow_unmapped=True)
