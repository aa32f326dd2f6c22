"""A style the toy teacher never saw, a way to measure it, and a style LoRA trained on it.

Style ``"hollow"`` (the default; line-art): every shape is drawn as its contour only, a band 5 px wide at
64x64 inside the shape's edge, in the shape's colour; the interior shows the background. Thin parts (the
arms of small crosses) stay solid. Style ``"outline"``: a 4 px dark contour (light on the black background)
around the solid shape, kept for reference (three-colour edges are hard for the toy VAE).

Styled scenes have one shape on a plain background (the pixel measures below need one centroid and a flat
border), and are
rendered from the same pieces as :func:`stepdistill.toy.scenes.render` (grid, background, shape mask), so
``render_styled(scene, style="none")`` is bit-identical to ``scenes.render(scene)`` (a test holds it to
that); contours are cut from the 2x supersampled shape mask by morphological erosion/dilation.

Style strength (:func:`style_strength`), from pixels alone (no scene labels); ``d`` = max channel difference:

* ``hollow``: background ``b`` = per-channel median of the image's 1-px border; foreground ``F`` = pixels with
  ``d(x, b) > 0.25``; ``f`` = mean colour of ``F``; ``c`` = mean colour of the 3x3 pixels at the centroid of
  ``F``; strength = ``d(c, f) / (d(c, f) + d(c, b))``: 0 when the shape's centre has the shape's colour
  (solid), 1 when it shows the background (hollow).
* ``outline``: ``b`` and ``F`` as above; ink = black if the luminance of ``b`` is above 0.25, else white; the
  edge band = pixels of ``F`` within 2 px of a non-``F`` pixel; strength = share of the band within 0.3 of
  the ink colour.

An image with fewer than 4 foreground pixels (nothing drawn) scores 0; the reported value is the mean over
images. Values on real renders (:func:`reference_strengths`) are in the stacking report and in
``docs/using-adapters.md``.

:func:`train_style_lora` fine-tunes a LoRA on the UNet with the teacher's own objective (epsilon prediction,
DDPM noise on SD's schedule, 10 % caption dropout so guidance keeps working) on styled renders with the
ordinary captions, and saves it in the kohya layout with ``stepdistill.method = style``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .. import lora
from ..eval import metrics
from ..models.family import family_of
from ..models.pipeline import load_pipeline
from ..toy import scenes as S
from ..toy.teacher import encode_pool, images_to_tensor

STYLES = ("none", "hollow", "outline")
DEFAULT_STYLE = "hollow"
HOLLOW_WIDTH = 5.0     # px at the render resolution (64): contour band inside the shape edge
OUTLINE_OUTSIDE = 2.0  # px at the render resolution, outside the shape edge
OUTLINE_INSIDE = 2.0   # px inside it
BACKGROUNDS_BASE = {k: v[0] for k, v in S.BACKGROUNDS.items()}  # base grey of each background
INK_DARK = (0.05, 0.05, 0.05)
INK_LIGHT = (0.95, 0.95, 0.95)
FOREGROUND_THRESHOLD = 0.25
INK_TOLERANCE = 0.3
BAND_WIDTH = 2
MIN_BAND_PIXELS = 4


# ----------------------------------------------------------------------------------------------- rendering


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation by an octagon of radius ``steps`` (alternating 4- and 8-neighbour steps ~ a disk)."""
    m = mask.copy()
    for i in range(steps):
        p = np.pad(m, 1, mode="constant", constant_values=False)
        out = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
        if i % 2 == 1:
            out |= p[:-2, :-2] | p[:-2, 2:] | p[2:, :-2] | p[2:, 2:]
        m = out
    return m


def _erode(mask: np.ndarray, steps: int, border: bool = False) -> np.ndarray:
    m = mask.copy()
    for i in range(steps):
        p = np.pad(m, 1, mode="constant", constant_values=border)
        out = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        if i % 2 == 1:
            out &= p[:-2, :-2] & p[:-2, 2:] & p[2:, :-2] & p[2:, 2:]
        m = out
    return m


def ink_for_background(bg) -> np.ndarray:
    bg = np.asarray(bg, dtype=np.float64)
    lum = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return np.array(INK_DARK if lum > 0.25 else INK_LIGHT)


def render_styled(scene, resolution: int = S.RESOLUTION, supersample: int = 2, style: str = DEFAULT_STYLE) -> np.ndarray:
    """``scenes.render`` with a style applied; ``style="none"`` reproduces ``scenes.render`` exactly."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; one of {STYLES}")
    xs, ys = S.sample_grid(resolution, supersample)
    bg = np.repeat(S.background_grey(scene, xs, ys)[..., None], 3, axis=-1)
    shape = S.shapes_mask(scene, xs, ys)
    fg = S.shape_colour(scene)
    if style == "none":
        img = np.where(shape[..., None], fg, bg)
    elif style == "hollow":
        band = shape & ~_erode(shape, int(round(HOLLOW_WIDTH * supersample)))
        img = np.where(band[..., None], fg, bg)
    else:
        outer = _dilate(shape, int(round(OUTLINE_OUTSIDE * supersample)))
        inner = _erode(shape, int(round(OUTLINE_INSIDE * supersample)))
        ink = ink_for_background([BACKGROUNDS_BASE[scene.background]] * 3)
        img = np.where((outer & ~inner)[..., None], ink, np.where(inner[..., None], fg, bg))
    return S.downsample(img, resolution, supersample)


def styleable(scene) -> bool:
    """Scenes the style measures read reliably: one shape on a plain background."""
    return scene.texture == "plain" and scene.count == "one"


def style_prompts(n: int, seed: int) -> list[str]:
    """``n`` captions of styleable scenes (one shape) naming a plain background: the prompts style is measured on."""
    _, scenes = sample_styled_scenes(n, seed, style="none")
    return [S.caption_of({**{k: getattr(s, k) for k in s.named}, "texture": "plain"}) for s in scenes]


def sample_styled_scenes(n: int, seed: int, resolution: int = S.RESOLUTION, style: str = DEFAULT_STYLE,
                         where=None, only_styleable: bool = True) -> tuple[np.ndarray, list]:
    """``n`` one-shape scenes from ``seed`` on plain backgrounds (the style measures need one centroid and a flat
    border), rendered in ``style``. ``where(scene) -> bool`` keeps only matching scenes too (drawing until ``n`` are
    found). ``only_styleable=False``: scenes of the whole world (any count and texture), as training data."""
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < n:
        s = S.random_scene(rng)
        if (styleable(s) or not only_styleable) and (where is None or where(s)):
            scenes.append(s)
    return np.stack([render_styled(s, resolution, style=style) for s in scenes]), scenes


# ----------------------------------------------------------------------------------------------- measuring


def _background_and_foreground(img: np.ndarray):
    frame = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(frame, axis=0)
    return bg, np.abs(img - bg).max(axis=-1) > FOREGROUND_THRESHOLD


def _as_unit(images) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def hollow_strength_per_image(images) -> np.ndarray:
    out = []
    for img in _as_unit(images):
        bg, fg_mask = _background_and_foreground(img)
        if fg_mask.sum() < MIN_BAND_PIXELS:
            out.append(0.0)
            continue
        ys, xs = np.nonzero(fg_mask)
        y0, x0 = int(round(ys.mean())), int(round(xs.mean()))
        c = img[max(0, y0 - 1):y0 + 2, max(0, x0 - 1):x0 + 2].reshape(-1, 3).mean(0)
        f = img[fg_mask].mean(0)
        d_f, d_b = np.abs(c - f).max(), np.abs(c - bg).max()
        out.append(float(d_f / (d_f + d_b)) if d_f + d_b > 0 else 0.0)
    return np.array(out)


def outline_strength_per_image(images) -> np.ndarray:
    x = _as_unit(images)
    out = np.zeros(len(x))
    for i, img in enumerate(x):
        bg, fg_mask = _background_and_foreground(img)
        band = fg_mask & ~_erode(fg_mask, BAND_WIDTH, border=True)
        if band.sum() < MIN_BAND_PIXELS:
            continue
        inky = np.abs(img - ink_for_background(bg)).max(axis=-1) < INK_TOLERANCE
        out[i] = (band & inky).sum() / band.sum()
    return out


def style_strength_per_image(images, style: str = DEFAULT_STYLE) -> np.ndarray:
    """Per-image strength in [0, 1] of ``style`` (see the module docstring); ``images``: uint8 (N, H, W, 3)."""
    if style == "hollow":
        return hollow_strength_per_image(images)
    if style == "outline":
        return outline_strength_per_image(images)
    raise ValueError(f"no strength measure for style {style!r}; one of hollow, outline")


def style_strength(images, style: str = DEFAULT_STYLE) -> float:
    """Mean strength of ``style`` over ``images`` (uint8 (N, H, W, 3))."""
    return float(style_strength_per_image(images, style).mean())


def reference_strengths(n: int = 500, seed: int = 4242, vae=None, style: str = DEFAULT_STYLE) -> dict:
    """``style``'s strength on real renders, unstyled and styled, and (with ``vae``) after a VAE encode/decode
    -- the ceiling a latent model can reach through that VAE; plus the toy prompt accuracy of each."""
    plain, scenes = sample_styled_scenes(n, seed, style="none")
    styled, _ = sample_styled_scenes(n, seed, style=style)
    prompts = [s.caption for s in scenes]
    sets = {"unstyled": plain, "styled": styled}
    if vae is not None:
        sets.update(unstyled_vae_roundtrip=vae_roundtrip(vae, plain), styled_vae_roundtrip=vae_roundtrip(vae, styled))
    out = {"n": n, "seed": seed, "style": style}
    for name, images in sets.items():
        out[name] = style_strength(images, style)
        out[f"{name}_prompt_accuracy"] = metrics.prompt_accuracy(images, prompts)["prompt_accuracy"]
    return out


def vae_roundtrip(vae, images: np.ndarray, batch: int = 256) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images_to_tensor(images[i:i + batch]).to(vae.device, vae.dtype)
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
            outs.append(((y.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(outs)


# ----------------------------------------------------------------------------------------------- training


@dataclass
class StyleRecipe:
    style: str = DEFAULT_STYLE
    n_images: int = 3000
    data_seed: int = 9000       # distinct from the teacher's (1000) and classifier's (2000) pools
    rank: int = 8
    alpha: float | None = None  # default = rank
    learning_rate: float = 1e-3
    warmup: int = 20
    steps: int = 500
    batch_size: int = 32
    caption_dropout: float = 0.1
    seed: int = 0


def _lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


def encode_scene_pool(pipe, images, scenes, device) -> dict:
    """The VAE posterior (mean, std) of each image and the text-encoder context of each distinct caption plus the
    empty prompt (last row), once, for :func:`denoising_finetune`."""
    with torch.no_grad():
        lat_mean, lat_std = encode_pool(pipe.vae, images_to_tensor(images).to(device))
        captions = sorted({s.caption for s in scenes})
        index = {c: i for i, c in enumerate(captions)}
        tok = pipe.tokenizer
        ids = tok(captions + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        context = torch.cat([pipe.text_encoder(ids[i:i + 256])[0] for i in range(0, len(ids), 256)])
    return {"lat_mean": lat_mean, "lat_std": lat_std, "context": context, "empty_idx": len(captions),
            "caption_idx": torch.tensor([index[s.caption] for s in scenes])}


def denoising_finetune(pipe, pool: dict, params, *, steps: int, batch_size: int, learning_rate: float,
                       caption_dropout: float, gen, device, warmup: int = 0, log_every: int = 50,
                       label: str = "fine-tune") -> list[float]:
    """Train ``params`` of ``pipe.unet`` with the base's own objective (DDPM noise on its schedule, DDPM eq. 14
    "simple" loss on epsilon, or on v for v-prediction bases), latents drawn from the pool's VAE posteriors,
    ``caption_dropout`` of the captions replaced by the empty prompt so guidance keeps working. AdamW (wd 0.01),
    linear warm-up over ``warmup`` steps, grad-norm clip 1. All randomness from ``gen``. Returns the losses."""
    lat_mean, lat_std, context = pool["lat_mean"], pool["lat_std"], pool["context"]
    scaling = pipe.vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    prediction_type = noise_scheduler.config.get("prediction_type", "epsilon")
    unet = pipe.unet
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup))
    unet.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(lat_mean), (batch_size,), generator=gen)
        eps_lat = torch.randn(lat_mean[idx].shape, generator=gen)
        latents = (lat_mean[idx] + lat_std[idx] * eps_lat.to(device)) * scaling
        cidx = pool["caption_idx"][idx].clone()
        cidx[torch.rand(len(idx), generator=gen) < caption_dropout] = pool["empty_idx"]
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
        pred = unet(noisy, t, context[cidx.to(device)]).sample
        loss = F.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"{label} step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f}", flush=True)
    unet.eval()
    return losses


def train_style_lora(base: str, out_dir: str | Path, recipe: StyleRecipe = StyleRecipe(),
                     device: str = "cpu", log_every: int = 50) -> Path:
    """Fine-tune a LoRA on ``base``'s UNet on ``recipe.style`` renders (epsilon objective); returns the file."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed + 17)
    pipe = load_pipeline(base, device=device, dtype=torch.float32)
    images, scenes = sample_styled_scenes(recipe.n_images, recipe.data_seed, style=recipe.style)
    pool = encode_scene_pool(pipe, images, scenes, device)
    unet = pipe.unet
    unet.requires_grad_(False)
    lora.add_lora_to_unet(unet, rank=recipe.rank, alpha=recipe.alpha)
    params = [p for p in unet.parameters() if p.requires_grad]
    losses = denoising_finetune(pipe, pool, params, steps=recipe.steps, batch_size=recipe.batch_size,
                                learning_rate=recipe.learning_rate, caption_dropout=recipe.caption_dropout,
                                warmup=recipe.warmup, gen=gen, device=device, log_every=log_every,
                                label="style lora")
    seconds = time.perf_counter() - t0
    card = {
        "title": f"{recipe.style} style LoRA (stepdistill toy)", "method": "style", "style": recipe.style,
        "method_name": "style LoRA (epsilon fine-tuning)", "base_model": base,
        "scheduler": "any (trained like the base: epsilon objective)",
        "train_steps": recipe.steps, "train_seconds": round(seconds, 1),
        "final_loss": round(float(np.mean(losses[-50:])), 5), "recipe": json.dumps(asdict(recipe), sort_keys=True),
    }

    path = lora.save_lora(out_dir, unet, format="kohya", base_model_version=family_of(pipe).base_model_tag(unet),
                             metadata={f"stepdistill.{k}": v for k, v in card.items() if k != "title"},
                             title=card["title"])
    (out_dir / "stepdistill_card.json").write_text(json.dumps(card, indent=1))
    return path
