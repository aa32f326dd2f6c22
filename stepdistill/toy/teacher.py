"""Train the toy teacher from scratch: the VAE first, then the text encoder and UNet together.

Stage 1 fits ``AutoencoderKL`` on rendered scenes (MSE + a small KL term, as SD's VAE) and sets
``scaling_factor`` to 1/std of the latents (SD 1.5's 0.18215 was found the same way). Stage 2 caches
the VAE posterior of a pool of scenes once, then trains ``CLIPTextModel`` + ``UNet2DConditionModel``
with the standard epsilon objective (DDPM, Ho et al. 2020, eq. 14) on SD's noise schedule, dropping
10% of captions to the empty prompt so classifier-free guidance works (Ho & Salimans 2022). An EMA of
the weights is what gets saved. Deterministic from the seed on a given machine and torch version.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from . import models
from .scenes import sample_scenes
from .tokenizer import build_toy_tokenizer


@dataclass
class TeacherRecipe:
    seed: int = 0
    pool_size: int = 30000
    vae_steps: int = 1500
    vae_batch: int = 64
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    unet_steps: int = 6000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    snapshot_every: int = 0  # also save the EMA pipeline every N UNet steps (0: only at the end)
    device: str = "cpu"      # "cuda" trains on a GPU (randomness stays on the CPU generator)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the range SD's VAE takes."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05
    return f


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def train_vae(images: torch.Tensor, recipe: TeacherRecipe, writer=None):
    gen = torch.Generator().manual_seed(recipe.seed)
    dev = torch.device(recipe.device)
    vae = models.build_vae().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, recipe.vae_steps))
    bar = tqdm(range(recipe.vae_steps), desc="vae")
    for step in bar:
        idx = torch.randint(0, len(images), (recipe.vae_batch,), generator=gen)
        x = images[idx].to(dev)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(dev)
        recon = vae.decode(z).sample
        rec_loss = F.mse_loss(recon, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec_loss + recipe.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.2f}")
            if writer:
                writer.add_scalar("vae/recon_mse", rec_loss.item(), step)
                writer.add_scalar("vae/kl", kl.item(), step)
    vae.eval()
    with torch.no_grad():
        sample = torch.cat([vae.encode(images[i:i + 512].to(dev)).latent_dist.mean
                            for i in range(0, min(len(images), 4096), 512)])
    scaling_factor = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return vae


@torch.no_grad()
def encode_pool(vae, images: torch.Tensor, batch: int = 512):
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i:i + batch].to(vae.device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_text_and_unet(lat_mean, lat_std, captions, vae_scaling: float, recipe: TeacherRecipe, writer=None,
                        on_snapshot=None):
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    tokenizer = build_toy_tokenizer()
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    text_encoder = models.build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                             tokenizer.pad_token_id)
    unet = models.build_unet()
    dev = torch.device(recipe.device)
    text_encoder.to(dev)
    unet.to(dev)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in models.SD_SCHEDULER_CONFIG.items()
                                       if k not in ("skip_prk_steps", "set_alpha_to_one")})
    alphas_cumprod = noise_scheduler.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup, recipe.unet_steps))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    bar = tqdm(range(recipe.unet_steps), desc="unet+text")
    for step in bar:
        idx = torch.randint(0, len(lat_mean), (recipe.unet_batch,), generator=gen)
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * vae_scaling
        batch_ids = ids[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < recipe.caption_dropout
        batch_ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).to(dev)
        noise, t = noise.to(dev), t.to(dev)
        context = text_encoder(batch_ids.to(dev))[0]
        pred = unet(noisy, t, context).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if writer:
                writer.add_scalar("unet/loss", loss.item(), step)
                writer.add_scalar("unet/lr", sched.get_last_lr()[0], step)
        if on_snapshot and recipe.snapshot_every and (step + 1) % recipe.snapshot_every == 0:
            on_snapshot(step + 1, tokenizer, ema_text, ema_unet)
    return tokenizer, ema_text, ema_unet


def assemble_pipeline(vae, text_encoder, tokenizer, unet):
    """A stock ``StableDiffusionPipeline`` around the toy components (no safety checker)."""
    from diffusers import StableDiffusionPipeline  # heavy: the pipeline module pulls in transformers' image processors


    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=models.build_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def build_random_pipeline(seed: int = 0):
    """The toy pipeline's architecture with random weights (seeded; VAE, text encoder, UNet built in that order):
    a stand-in for mechanics tests, where trained weights are not needed."""
    torch.manual_seed(seed)
    tok = build_toy_tokenizer()
    vae = models.build_vae()
    text_encoder = models.build_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    return assemble_pipeline(vae, text_encoder, tok, models.build_unet())


def train_teacher(out_dir: str | Path, recipe: TeacherRecipe = TeacherRecipe(), log_dir: str | None = None):
    """Train VAE, then text encoder + UNet, and save a ``StableDiffusionPipeline`` directory at ``out_dir``."""
    torch.manual_seed(recipe.seed)
    writer = None
    if log_dir:
        writer = SummaryWriter(log_dir)
    images_np, scenes = sample_scenes(recipe.pool_size, seed=recipe.seed + 1000)
    images = images_to_tensor(images_np)
    vae = train_vae(images, recipe, writer)
    lat_mean, lat_std = encode_pool(vae, images)

    def snapshot(step, tokenizer, text_encoder, unet):
        assemble_pipeline(copy.deepcopy(vae).cpu(), copy.deepcopy(text_encoder).cpu(), tokenizer,
                          copy.deepcopy(unet).cpu()).save_pretrained(f"{out_dir}-step{step}")

    tokenizer, text_encoder, unet = train_text_and_unet(
        lat_mean, lat_std, [s.caption for s in scenes], vae.config.scaling_factor, recipe, writer, snapshot)
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet).to("cpu")
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    if writer:
        writer.close()
    return pipe
