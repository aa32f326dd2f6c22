"""Tiny models and helpers shared by several test modules (fixtures live in conftest.py): random SDXL- and
SD3-shaped pipelines, a point-mass UNet whose probability-flow ODE is straight, and a LoRA perturbation."""
from __future__ import annotations

import types

import torch

from stepdistill import parametrization

PROMPTS = ["a red circle", "a blue square", "a red circle", "a small green triangle", "a big red square"]


def lora_params(model) -> list[torch.nn.Parameter]:
    """The LoRA parameters (peft ``lora_A`` / ``lora_B``) of ``model``."""
    return [p for n, p in model.named_parameters() if "lora_" in n]


def descend(loss_fn, params, steps: int, optimizer=torch.optim.Adam, **optimizer_kw):
    """``steps`` optimizer steps on ``loss_fn()`` (a fresh forward each step) over ``params``."""
    opt = optimizer(params, **optimizer_kw)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


def v_prediction_pipe(pipe):
    from diffusers import PNDMScheduler

    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    return pipe


def cs_ac(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod


def tiny_sdxl_pipe():
    """An SDXL-shaped pipeline with random weights (two CLIP encoders, text_time micro-conditioning)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from stepdistill.toy import models
    from stepdistill.toy.tokenizer import build_toy_tokenizer

    torch.manual_seed(0)
    tok = build_toy_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16)
    sched = EulerDiscreteScheduler.from_config(models.SD_SCHEDULER_CONFIG)  # from_config drops foreign keys
    pipe = StableDiffusionXLPipeline(vae=models.build_vae().eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**kw)).eval(),
                                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=16, **kw)).eval(),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet.eval(), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PointMassUNet(torch.nn.Module):
    """The exact denoiser of a point-mass data distribution at ``c``: its probability-flow ODE is a straight line
    from any noise to ``c`` (every solver should land on ``c`` exactly)."""

    def __init__(self, c, alphas_cumprod, prediction_type="epsilon"):
        super().__init__()
        self.register_buffer("c", c)
        self.ac, self.prediction_type = alphas_cumprod, prediction_type
        self.config = types.SimpleNamespace(in_channels=c.shape[0], sample_size=c.shape[-1])
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    @property
    def dtype(self):
        return torch.float32

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kw):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        abar = parametrization.vp_alphas_cumprod_at(t.cpu(), self.ac).float().reshape(-1, 1, 1, 1).to(sample.device)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        eps = (sample - a * self.c) / s
        out = eps if self.prediction_type == "epsilon" else a * eps - s * self.c
        out = out + 0 * self.anchor
        return types.SimpleNamespace(sample=out) if return_dict else (out,)


def point_mass_pipe(tiny_random_pipe, prediction_type="epsilon", seed=5):
    c = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed))
    p = tiny_random_pipe
    sched = v_prediction_pipe(p).scheduler if prediction_type == "v_prediction" else p.scheduler
    unet = PointMassUNet(c, cs_ac(p), prediction_type)
    return types.SimpleNamespace(unet=unet, scheduler=sched, device=torch.device("cpu"), vae_scale_factor=4,
                                 encode_prompt=p.encode_prompt, vae=p.vae), c


def t5_tokenizer():
    """A T5 (unigram sentencepiece-style) tokenizer over the toy words, built offline with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    from stepdistill.toy.tokenizer import caption_word_counts

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in sorted(caption_word_counts())]
    vocab += [(ch, -8.0) for ch in "abcdefghijklmnopqrstuvwxyz\u2581"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def tiny_sd3_pipe(shift: float = 1.0):
    """An SD3-shaped pipeline with random weights: SD3Transformer2DModel, a 16-channel AutoencoderKL, two tiny CLIP
    text encoders with projection (the toy CLIP tokenizer) and a tiny T5 encoder."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from stepdistill.toy.tokenizer import build_toy_tokenizer

    torch.manual_seed(0)
    tok, t5tok = build_toy_tokenizer(), t5_tokenizer()

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=16, hidden_act="quick_gelu", bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    te, te2 = clip(), clip()
    te3 = T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=16, norm_num_groups=8, sample_size=16)
    for m in (te, te2, te3, transformer, vae):
        m.eval()  # T5's dropout is on in a freshly built model
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                    text_encoder_3=te3, tokenizer_3=t5tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def perturb_lora(unet, adapter_name: str, seed: int, std: float = 0.05):
    """Gaussian init leaves lora_B = 0 (delta 0); give every layer a non-zero random delta."""
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, LoraLayer) and adapter_name in m.lora_B:
                w = m.lora_B[adapter_name].weight
                w.copy_(torch.randn(w.shape, generator=g) * std)
