"""Train the toy teacher from scratch: the VAE first, then the text encoder and UNet together.

Stage 1 fits ``AutoencoderKL`` on rendered scenes (MSE + a small KL term, as SD's VAE) and sets
``scaling_factor`` to 1/std of the latents (SD 1.5's 0.18215 was found the same way). Stage 2 caches
the VAE posterior of a pool of scenes once, then trains ``UNet2DConditionModel`` with the standard
epsilon objective (DDPM, Ho et al. 2020, eq. 14; optionally Min-SNR weighted, Hang et al. 2023) on SD's
noise schedule, dropping 10% of captions to the empty prompt so classifier-free guidance works (Ho &
Salimans 2022). The ``CLIPTextModel`` is frozen, as SD's is (a seeded random init: every word gets its own
embedding; ``freeze_text_encoder=False`` trains it jointly, as the first toy world did). Each image is
seen under several captions naming different subsets of its attributes. An EMA of the weights is what
gets saved. Deterministic from the seed on a given machine and torch version.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch.utils.tensorboard import SummaryWriter
from transformers import CLIPTextModel
from tqdm.auto import tqdm

from . import models
from .scenes import random_caption, sample_scenes
from .tokenizer import build_toy_tokenizer

CAPTIONS_PER_IMAGE = 4


@dataclass
class TeacherRecipe:
    seed: int = 0
    pool_size: int = 60000
    vae_steps: int = 4000
    vae_batch: int = 128
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    unet_steps: int = 20000
    unet_batch: int = 256
    unet_lr: float = 1e-3
    warmup: int = 500
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    snapshot_every: int = 0  # also save the EMA pipeline every N UNet steps (0: only at the end)
    device: str = "cpu"      # "cuda" trains on a GPU (randomness stays on the CPU generator)
    workers: int = 1         # processes rendering the scene pool
    unet_seconds: float = 0  # > 0: fit unet_steps to this wall-clock budget, timed over the first 50 steps
    vae_seconds: float = 0   # > 0: the same for vae_steps
    freeze_text_encoder: bool = True  # SD's way: a fixed text encoder (here: seeded random init, see below)
    text_embedding_std: float = 0.5   # token-embedding scale of the frozen encoder (CLIP's init: 0.02)
    min_snr_gamma: float = 0.0  # > 0: Min-SNR loss weighting min(SNR, gamma) / SNR (Hang et al. 2023, eq. 7)
    resume_from: str = ""    # a toy pipeline directory: keep its VAE, continue its UNet (and its text encoder if not frozen)
    seed_offset: int = 0     # shifts the pool and batch seeds of a continued run (so it sees new scenes)


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
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def _fit_to_budget(step: int, plan: dict, seconds: float, max_steps: int, dev, bar):
    """With a wall-clock budget, time steps 10-50 and set ``plan["total"]`` to the steps that fit (at most ``max_steps``)."""
    if not seconds or step not in (10, 50):
        return
    if dev.type == "cuda":
        torch.cuda.synchronize()
    if step == 10:
        plan["t10"] = time.perf_counter()
        return
    per_step = (time.perf_counter() - plan["t10"]) / 40
    plan["total"] = min(max_steps, max(100, int(seconds / per_step)))
    bar.total = plan["total"]


def train_vae(images: torch.Tensor, recipe: TeacherRecipe, writer=None):
    gen = torch.Generator().manual_seed(recipe.seed)
    dev = torch.device(recipe.device)
    vae = models.build_vae().to(dev)
    images = images.to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    plan = {"total": recipe.vae_steps}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_lambda(100, plan["total"])(step))
    bar = tqdm(total=recipe.vae_steps, desc="vae")
    step = 0
    while step < plan["total"]:
        _fit_to_budget(step, plan, recipe.vae_seconds, recipe.vae_steps, dev, bar)
        idx = torch.randint(0, len(images), (recipe.vae_batch,), generator=gen).to(dev)
        x = images[idx]
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
        step += 1
        bar.update(1)
    recipe.vae_steps = plan["total"]
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
    gen = torch.Generator().manual_seed(recipe.seed + 1 + recipe.seed_offset)
    tokenizer = build_toy_tokenizer()
    variants = [c if isinstance(c, (list, tuple)) else [c] for c in captions]  # per image: its captions
    n_var = len(variants[0])
    unique = sorted({c for v in variants for c in v})  # tokenize each distinct caption once
    unique_ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
    row = {c: i for i, c in enumerate(unique)}
    ids_rows = torch.tensor([[row[c] for c in v] for v in variants])  # (N, n_var): index into unique
    ids = unique_ids[ids_rows]  # (N, n_var, 77)
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    text_encoder = models.build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                             tokenizer.pad_token_id)
    unet = models.build_unet()
    if recipe.freeze_text_encoder:
        # A frozen, seeded random CLIP: every caption word gets its own well-separated embedding from the first step.
        # Trained jointly from scratch, the encoder kept colour words apart (they move many pixels) and let shape
        # and position words collapse under weight decay before the UNet could learn to use them.
        with torch.no_grad():
            g = torch.Generator().manual_seed(recipe.seed + 77)
            emb = text_encoder.get_input_embeddings().weight
            emb.copy_(torch.randn(emb.shape, generator=g) * recipe.text_embedding_std)
        text_encoder.requires_grad_(False)
    elif recipe.resume_from:
        text_encoder.load_state_dict(CLIPTextModel.from_pretrained(recipe.resume_from, subfolder="text_encoder").state_dict())
    if recipe.resume_from:
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(recipe.resume_from, subfolder="unet").state_dict())
    dev = torch.device(recipe.device)
    text_encoder.to(dev)
    unet.to(dev)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in models.SD_SCHEDULER_CONFIG.items()
                                       if k not in ("skip_prk_steps", "set_alpha_to_one")})
    alphas_cumprod = noise_scheduler.alphas_cumprod
    params = list(unet.parameters()) + [p for p in text_encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=1e-2)
    plan = {"total": recipe.unet_steps}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_lambda(recipe.warmup, plan["total"])(step))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    contexts = None
    if recipe.freeze_text_encoder:  # a fixed encoder: encode every distinct caption once, look them up per step
        with torch.no_grad():
            contexts = torch.cat([text_encoder(unique_ids[i:i + 1024].to(dev))[0]
                                  for i in range(0, len(unique_ids), 1024)])
            empty_context = text_encoder(empty_ids.to(dev))[0]
        rows_dev = ids_rows.to(dev)
    bar = tqdm(total=recipe.unet_steps, desc="unet+text")
    step = 0
    while step < plan["total"]:
        _fit_to_budget(step, plan, recipe.unet_seconds, recipe.unet_steps, dev, bar)
        idx = torch.randint(0, len(lat_mean), (recipe.unet_batch,), generator=gen)
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * vae_scaling
        variant = torch.randint(0, n_var, (len(idx),), generator=gen)
        drop = torch.rand(len(idx), generator=gen) < recipe.caption_dropout
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).to(dev)
        noise, t = noise.to(dev), t.to(dev)
        if contexts is not None:
            context = contexts[rows_dev[idx.to(dev), variant.to(dev)]]
            context[drop.to(dev)] = empty_context
        else:
            batch_ids = ids[idx, variant].clone()
            batch_ids[drop] = empty_ids
            context = text_encoder(batch_ids.to(dev))[0]
        pred = unet(noisy, t, context).sample
        loss = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if recipe.min_snr_gamma > 0:  # epsilon-prediction form: weight min(SNR, gamma) / SNR, SNR = abar / (1 - abar)
            snr = (a / (1 - a)).view(-1).to(dev)
            loss = loss * snr.clamp(max=recipe.min_snr_gamma) / snr
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        if not recipe.freeze_text_encoder:
            _ema_update(ema_text, text_encoder, decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if writer:
                writer.add_scalar("unet/loss", loss.item(), step)
                writer.add_scalar("unet/lr", sched.get_last_lr()[0], step)
        if on_snapshot and recipe.snapshot_every and (step + 1) % recipe.snapshot_every == 0:
            on_snapshot(step + 1, tokenizer, ema_text, ema_unet)
        step += 1
        bar.update(1)
    recipe.unet_steps = plan["total"]  # what was run, recorded with the weights
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
    images_np, scenes = sample_scenes(recipe.pool_size, seed=recipe.seed + 1000 + recipe.seed_offset,
                                      workers=recipe.workers)
    images = images_to_tensor(images_np)
    if recipe.resume_from:
        vae = AutoencoderKL.from_pretrained(recipe.resume_from, subfolder="vae").to(recipe.device).eval()
    else:
        vae = train_vae(images, recipe, writer)
    lat_mean, lat_std = encode_pool(vae, images)

    def snapshot(step, tokenizer, text_encoder, unet):
        assemble_pipeline(copy.deepcopy(vae).cpu(), copy.deepcopy(text_encoder).cpu(), tokenizer,
                          copy.deepcopy(unet).cpu()).save_pretrained(f"{out_dir}-step{step}")

    rng = np.random.default_rng(recipe.seed + 2000 + recipe.seed_offset)  # each image is seen under CAPTIONS_PER_IMAGE captions
    captions = [[random_caption(s, rng).caption for _ in range(CAPTIONS_PER_IMAGE)] for s in scenes]
    tokenizer, text_encoder, unet = train_text_and_unet(
        lat_mean, lat_std, captions, vae.config.scaling_factor, recipe, writer, snapshot)
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet).to("cpu")
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    (Path(out_dir) / "toy_recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=1) + "\n")
    if writer:
        writer.close()
    return pipe
