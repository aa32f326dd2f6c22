"""LoRA files: add a LoRA to a diffusers UNet or SD3 / FLUX transformer, save it in a layout every tool loads,
read any common layout back, convert and describe files, and check that a stock diffusers pipeline really
received every layer.

Everything works on one in-memory form, the layer dict ``{diffusers module path: (down, up, alpha)}`` with
effective update ``alpha / r * up @ down`` (:mod:`.layers`). Scope: plain LoRA (no DoRA, LoCon/LoHa, bias or
text-encoder layers) on ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL) and the SD3 / FLUX.1 transformers.

Modules:

* :mod:`.peft_adapter` -- the trainable peft adapter: add it, read its layers, start it from a file;
* :mod:`.kohya` -- kohya's ``lora_unet_*`` layout (the default, read by diffusers, ComfyUI, A1111);
* :mod:`.diffusers_layout` -- diffusers' ``unet.*`` / ``transformer.*`` layout and alpha folding;
* :mod:`.flow_formats` -- transformer layouts (``comfy-flow``, onetrainer) and what ComfyUI maps;
* :mod:`.files` -- finding, opening, detecting and reading files; :mod:`.save` -- :func:`save_lora`;
* :mod:`.metadata` -- the ``ss_*`` / ``modelspec.*`` / ``stepdistill.*`` header;
  :mod:`.base_model_tags` -- base-model tags and inferring them from a file;
* :mod:`.average` -- the weighted mean of several adapters' updates, refactored into one (``stepdistill average``);
* :mod:`.verify` -- layer-by-layer load verification; :mod:`.export` / :mod:`.inspect` -- conversion
  and description (``stepdistill export`` / ``inspect``); :mod:`.trained` -- writing a training run's adapter;
  :mod:`.tools` -- which tools apply which layout.

Model-family knowledge (default targets, which denoiser a pipeline has) is :mod:`stepdistill.models.family`'s.
"""
from .average import average_adapters, average_layers
from .base_model_tags import BASE_MODEL_VERSIONS, FLOW_FAMILIES, UNET_FAMILY_NAMES, infer_family
from .diffusers_layout import FOLDED_ALPHA_KEY, to_diffusers
from .errors import LoraFormatError, LoraLoadError
from .export import FORMATS, Adapter, export_lora, read_adapter, write_adapter
from .files import (
    LORA_WEIGHT_NAME,
    lora_layers_from_state_dict,
    open_safetensors,
    read_lora,
    read_lora_layers,
    resolve_lora_file,
)
from .flow_formats import FLOW_KEYS, ONETRAINER_PREFIX, comfy_unmapped
from .inspect import format_inspection, inspect_lora, module_type
from .kohya import KOHYA_PREFIX, from_kohya, kohya_name, split_module_name, to_kohya
from .layers import LoraLayers, lora_delta, pairs_to_layers
from .metadata import build_metadata, stepdistill_metadata
from .peft_adapter import add_lora_to_unet, init_adapter_from_file, unet_lora_state_dict
from .save import save_lora
from .tools import DIFFUSERS_LAYOUT_NOTE, TOOL_SUPPORT, loads_fully_in
from .trained import save_trained_adapter
from .verify import LoraLoadReport, verify_lora_loaded

__all__ = [
    "Adapter", "BASE_MODEL_VERSIONS", "FLOW_FAMILIES", "FLOW_KEYS", "FOLDED_ALPHA_KEY", "FORMATS", "KOHYA_PREFIX",
    "LORA_WEIGHT_NAME", "LoraFormatError", "LoraLayers", "LoraLoadError", "LoraLoadReport", "ONETRAINER_PREFIX",
    "UNET_FAMILY_NAMES", "add_lora_to_unet", "average_adapters", "average_layers", "build_metadata", "comfy_unmapped",
    "export_lora", "format_inspection",
    "from_kohya", "infer_family", "init_adapter_from_file", "inspect_lora", "kohya_name", "lora_delta",
    "lora_layers_from_state_dict", "module_type", "open_safetensors", "pairs_to_layers", "read_adapter",
    "read_lora", "read_lora_layers", "resolve_lora_file", "save_lora", "save_trained_adapter", "split_module_name",
    "stepdistill_metadata", "to_diffusers", "to_kohya", "unet_lora_state_dict", "verify_lora_loaded",
    "write_adapter", "DIFFUSERS_LAYOUT_NOTE", "TOOL_SUPPORT", "loads_fully_in",
]
