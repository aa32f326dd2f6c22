"""The toy world's judge: a small CNN that reads a scene's attributes back from its pixels.

One shared trunk, one linear head per attribute (shape, colour, count, size, position, background,
texture) and a ``real`` head. Its penultimate features (64-d) play the role Inception features
play in FID.

The ``real`` head is what lets the features see the failure step distillation fixes: a few-step
sampler that cannot pick a mode returns the *average* of the modes, a blur. The head is trained
to tell rendered scenes (and their round trip through the world's own VAE, so the autoencoder's
softness is not held against a model) from averages of 2-4 renders of one caption and from
blurred renders. Trained by ``train/train_toy_classifier.py``; weights are committed in the package.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .scenes import ATTRIBUTES, RESOLUTION, random_scene, render_many, sample_scenes, scene_for_caption

FEATURE_DIM = 64
HEADS = {**{k: len(v) for k, v in ATTRIBUTES.items()}, "real": 2}
WEIGHTS = Path(__file__).parent / "weights" / "classifier.safetensors"
IGNORE = -1  # label of an attribute an image does not have (position of two shapes; attributes of a blend)


class SceneClassifier(nn.Module):
    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.trunk = nn.Sequential(block(3, 32), nn.AvgPool2d(2), block(32, 64), nn.AvgPool2d(2),
                                   block(64, 96), nn.AvgPool2d(2), block(96, 96))
        self.proj = nn.Linear(96 * 8 * 8, FEATURE_DIM)
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURE_DIM, n) for k, n in HEADS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: float (N, 3, H, W) in [0, 1]; resized to 64x64 when another size is given."""
        if images.shape[-1] != RESOLUTION or images.shape[-2] != RESOLUTION:
            images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True,
                                   align_corners=False)
        h = self.trunk(images * 2 - 1)
        return F.silu(self.proj(h.flatten(1)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {k: head(feats) for k, head in self.heads.items()}


def to_unit_tensor(images) -> torch.Tensor:
    """uint8 (N,H,W,3) array, float (N,H,W,3) array in [0,1], list of PIL images or a (N,3,H,W) tensor
    in [0,1] -> float tensor (N,3,H,W) in [0,1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, list):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    images = np.asarray(images)
    t = torch.from_numpy(np.ascontiguousarray(images)).float()
    if images.dtype == np.uint8:
        t = t / 255.0
    return t.permute(0, 3, 1, 2)


def label_tensor(scenes) -> dict[str, torch.Tensor]:
    labels = {k: torch.tensor([s.labels()[k] for s in scenes]) for k in ATTRIBUTES}
    labels["real"] = torch.ones(len(scenes), dtype=torch.long)
    return labels


def blends(n: int, seed: int, workers: int = 1) -> np.ndarray:
    """``n`` averages of 2-4 renders of one caption each: what a sampler that averages modes returns."""
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(n):
        caption = random_scene(rng).caption
        groups.append([scene_for_caption(caption, rng) for _ in range(int(rng.integers(2, 5)))])
    flat = render_many([s for g in groups for s in g], workers=workers).astype(np.float32)
    out, i = [], 0
    for g in groups:
        out.append(flat[i:i + len(g)].mean(0))
        i += len(g)
    return np.round(np.stack(out)).astype(np.uint8)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (``sigma`` in pixels, one per image) of an (N, 3, H, W) batch."""
    radius = 6
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (N, K)
    n, c, h, w = x.shape
    xp = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    kx = kernel.repeat_interleave(c, 0)
    xp = F.conv2d(xp, kx[:, None, None, :], groups=n * c)
    xp = F.conv2d(xp, kx[:, None, :, None], groups=n * c)
    return xp.reshape(n, c, h, w)


def train_classifier(steps: int = 3000, batch: int = 256, pool_size: int = 40000, seed: int = 0, lr: float = 2e-3,
                     device: str = "cpu", vae=None, workers: int = 1) -> SceneClassifier:
    """Train on rendered scenes (half of them through ``vae``'s round trip when one is given) and on
    blends and blurs labelled not-real, with light pixel noise."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    images_np, scenes = sample_scenes(pool_size, seed=seed + 2000, workers=workers)
    images = to_unit_tensor(images_np).to(dev)
    labels = {k: v.to(dev) for k, v in label_tensor(scenes).items()}
    if vae is not None:
        images_vae = vae_round_trip(vae, images)
    negatives = to_unit_tensor(blends(max(1, pool_size // 4), seed=seed + 3000, workers=workers)).to(dev)
    model = SceneClassifier().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(range(steps), desc="classifier")
    n_neg = batch // 4
    for step in bar:
        idx = torch.randint(0, pool_size, (batch - n_neg,), generator=gen).to(dev)
        x = images[idx]
        if vae is not None:
            use_vae = (torch.rand(len(idx), generator=gen) < 0.5).to(dev)
            x = torch.where(use_vae[:, None, None, None], images_vae[idx], x)
        nidx = torch.randint(0, len(negatives), (n_neg,), generator=gen).to(dev)
        neg = negatives[nidx]
        half = n_neg // 2  # half the negatives: blurred renders instead of blends
        sigma = (1.5 + 1.5 * torch.rand(half, generator=gen)).to(dev)
        neg = torch.cat([gaussian_blur(images[idx[:half]], sigma), neg[half:]])
        x = torch.cat([x, neg])
        noise = 0.04 * torch.rand(len(x), 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
        x = (x + noise.to(dev)).clamp(0, 1)
        logits = model(x)
        loss = 0.0
        for k in HEADS:
            if k == "real":
                target = torch.cat([torch.ones(len(idx), dtype=torch.long), torch.zeros(n_neg, dtype=torch.long)])
                target = target.to(dev)
            else:
                target = torch.cat([labels[k][idx], torch.full((n_neg,), IGNORE, device=dev)])
            loss = loss + F.cross_entropy(logits[k], target, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval().cpu()


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """``images`` (N, 3, H, W) in [0, 1] encoded (posterior mean) and decoded by ``vae``, back in [0, 1]."""
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(vae.device) * 2 - 1
        out.append(((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1).to(images.device))
    return torch.cat(out)


def load_classifier(path: str | Path = WEIGHTS) -> SceneClassifier:
    if not Path(path).exists():
        raise FileNotFoundError(f"toy classifier weights not found at {path}; run "
                                f"`python train/train_toy_classifier.py --out {path}` to create them")
    model = SceneClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def save_classifier(model: SceneClassifier, path: str | Path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
