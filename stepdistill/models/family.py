"""Model families: the one place that knows SD 1.x/2.x, SDXL, SD3 and FLUX.1 apart.

Like k-diffusion's ``external.py`` wrappers, a :class:`ModelFamily` says how a diffusers pipeline of that family
is driven: which component carries the LoRA (``unet`` / ``transformer``), whether its clock is a VP noise schedule
(``kind="vp"``: epsilon / v / x0 outputs) or a FlowMatch one (``kind="flow"``: the output is the velocity), how
its prompts are encoded, the default LoRA targets and the base-model tag written into adapter files (kohya's
``ss_base_model_version`` vocabulary: ``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``; ``sd3`` and ``flux1`` for the
flow transformers). Family *names* (``sd``, ``sdxl``, ``sd3``, ``flux``) are the only vocabulary the rest of the
code uses; the file tags are derived here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

from ..errors import ModelError

# The 14 module types diffusers' LCM-LoRA example (train_lcm_distill_lora_sd.py) adapts.
LCM_LORA_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]

# Transformer LoRA targets: the attention projections of both streams (image: to_q/k/v/to_out.0; text:
# add_q/k/v_proj/to_add_out) and the feed-forwards of both streams, as diffusers' train_dreambooth_lora_flux.py
# (its default 12; SD3's example adds the feed-forwards with --lora_layers). FLUX adds its single-stream blocks'
# proj_mlp / proj_out (their attention shares attn.to_q/k/v); "proj_out" also matches the final output layer.
# All of these are modules ComfyUI maps for SD3 / FLUX (stepdistill.lora.flow_formats.comfy_unmapped).
_TRANSFORMER_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                          "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_TRANSFORMER_FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
SD3_LORA_TARGET_MODULES = _TRANSFORMER_ATTENTION + _TRANSFORMER_FF
FLUX_LORA_TARGET_MODULES = _TRANSFORMER_ATTENTION + _TRANSFORMER_FF + ["proj_mlp", "proj_out"]


@dataclass(frozen=True)
class ModelFamily:
    name: str                 # "sd", "sdxl", "sd3", "flux"
    kind: str                 # "vp" (UNet on a VP noise schedule) or "flow" (FlowMatch transformer)
    component: str            # the pipeline attribute that carries the LoRA: "unet" or "transformer"
    lora_targets: tuple[str, ...]

    @property
    def is_flow(self) -> bool:
        return self.kind == "flow"

    def base_model_tag(self, model=None) -> str:
        """The adapter files' base-model tag: kohya's ``ss_base_model_version`` for UNets (``sd_v2`` from a
        cross-attention width of 1024), ``sd3`` / ``flux1`` for the flow transformers."""
        if self.name == "sdxl":
            return "sdxl_base_v1-0"
        if self.name == "sd3":
            return "sd3"
        if self.name == "flux":
            return "flux1"
        dim = getattr(getattr(model, "config", None), "cross_attention_dim", 768)
        return "sd_v2" if dim == 1024 else "sd_v1"


FAMILIES = {
    "sd": ModelFamily("sd", "vp", "unet", tuple(LCM_LORA_TARGET_MODULES)),
    "sdxl": ModelFamily("sdxl", "vp", "unet", tuple(LCM_LORA_TARGET_MODULES)),
    "sd3": ModelFamily("sd3", "flow", "transformer", tuple(SD3_LORA_TARGET_MODULES)),
    "flux": ModelFamily("flux", "flow", "transformer", tuple(FLUX_LORA_TARGET_MODULES)),
}
FLOW_FAMILY_NAMES = tuple(n for n, f in FAMILIES.items() if f.is_flow)


def denoiser_of(pipe_or_model):
    """The LoRA-carrying model of a pipeline (``unet`` or ``transformer``); a model is returned as is."""
    for name in ("unet", "transformer"):
        model = getattr(pipe_or_model, name, None)
        if isinstance(model, torch.nn.Module):
            return model
    if isinstance(pipe_or_model, torch.nn.Module):
        return pipe_or_model
    raise TypeError(f"{type(pipe_or_model).__name__} has neither a unet nor a transformer")


def family_of_model(model) -> ModelFamily | None:
    """The family of a denoiser (peft- or DDP-wrapped or not): by class for the transformers, by the UNet's
    ``addition_embed_type`` (SDXL's ``text_time``) for UNets; None for anything else."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    if isinstance(model, FluxTransformer2DModel):
        return FAMILIES["flux"]
    if isinstance(model, SD3Transformer2DModel):
        return FAMILIES["sd3"]
    if isinstance(model, UNet2DConditionModel):
        return FAMILIES["sdxl"] if model.config.get("addition_embed_type") == "text_time" else FAMILIES["sd"]
    return None


def family_of(pipe) -> ModelFamily:
    """The family of a pipeline (or of a bare denoiser); raises :class:`ModelError` for others. Another model in a
    pipeline's ``unet`` slot is driven as an SD UNet; an SD3-style pipeline (``text_encoder_3``) around another
    transformer class as SD3."""
    family = family_of_model(denoiser_of(pipe))
    if family is None and isinstance(getattr(pipe, "unet", None), torch.nn.Module):
        family = FAMILIES["sd"]
    if family is None and getattr(pipe, "transformer", None) is not None and hasattr(pipe, "text_encoder_3"):
        family = FAMILIES["sd3"]
    if family is None:
        raise ModelError(
            f"{type(pipe).__name__}: stepdistill supports UNet pipelines (SD 1.x/2.x, SDXL) and the SD3 / FLUX.1 "
            "flow-matching transformers")
    return family


def default_target_modules(model) -> list[str]:
    """The LoRA targets for ``model``: LCM-LoRA's 14 for UNets, the SD3 / FLUX lists for those transformers."""
    family = family_of_model(model)
    return list(family.lora_targets if family is not None else LCM_LORA_TARGET_MODULES)


@torch.no_grad()
def encode_prompts(pipe, captions: list[str], batch_size: int = 64, *, family: ModelFamily | None = None,
                   device=None, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """Text embeddings exactly as the pipeline computes them at inference (``pipe.encode_prompt``, no guidance),
    batched, float32 on the CPU (``to_cpu=False``: left on ``device``): ``prompt_embeds`` and, for SDXL / SD3 /
    FLUX, ``pooled``."""
    name = (family or family_of(pipe)).name
    device = device if device is not None else pipe.device
    embeds, pooled = [], []

    def keep(t):  # each chunk leaves the device as it is made, unless the caller wants it there
        return t.float().cpu() if to_cpu else t.float()

    for i in range(0, len(captions), batch_size):
        chunk = list(captions[i:i + batch_size])
        if name == "flux":
            e, p, _ = pipe.encode_prompt(prompt=chunk, prompt_2=None, device=device, num_images_per_prompt=1)
            pooled.append(keep(p))
        elif name == "sd3":
            e, _, p, _ = pipe.encode_prompt(prompt=chunk, prompt_2=None, prompt_3=None, device=device,
                                            num_images_per_prompt=1, do_classifier_free_guidance=False)
            pooled.append(keep(p))
        elif name == "sdxl":
            e, _, p, _ = pipe.encode_prompt(chunk, device=device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
            pooled.append(keep(p))
        else:
            e, _ = pipe.encode_prompt(chunk, device=device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)
        embeds.append(keep(e))
    out = {"prompt_embeds": torch.cat(embeds)}
    if pooled:
        out["pooled"] = torch.cat(pooled)
    return out


def sdxl_time_ids(height: int, width: int) -> torch.Tensor:
    """SDXL's micro-conditioning (original size, crop top-left, target size) for an uncropped square start."""
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
