"""Builders for the toy teacher: Stable Diffusion's architecture, scaled down.

Same classes and wiring as SD 1.5 (``AutoencoderKL``, ``CLIPTextModel``, ``UNet2DConditionModel`` with
cross-attention, the ``scaled_linear`` 0.00085-0.012 noise schedule over 1000 steps, epsilon
prediction, a 77-token text context and 4 latent channels), only narrower and shallower so it trains
and samples on a CPU. The VAE downsamples 8x like SD's (4 blocks), so 64x64 images have 8x8x4 latents. The UNet
keeps every module type SD's LoRA recipes target (to_q/k/v/out, proj_in/out, ff, conv1/2,
conv_shortcut, time_emb_proj, down/upsamplers).
"""
from __future__ import annotations

from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

RESOLUTION = 64
LATENT_SIZE = 8
LATENT_CHANNELS = 4
TEXT_HIDDEN = 64

# SD 1.5's scheduler config (diffusers' PNDMScheduler, as shipped with runwayml/stable-diffusion-v1-5)
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    timestep_spacing="leading",
)


def build_vae(scaling_factor: float = 1.0):
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        scaling_factor=scaling_factor,
    )


def build_text_encoder(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int):
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet():
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(48, 96),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_scheduler():
    return PNDMScheduler.from_config(SD_SCHEDULER_CONFIG)
