"""The toy world's judge: a small CNN that reads a scene's attributes back from its pixels.

One shared trunk, one linear head per attribute (shape, colour, background, size, position). Its
penultimate features (128-d) play the role Inception features play in FID. Trained by
``train/train_toy_classifier.py`` on freshly rendered scenes; weights are committed in the package.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .scenes import ATTRIBUTES, sample_scenes

FEATURE_DIM = 128
WEIGHTS = Path(__file__).parent / "weights" / "classifier.safetensors"


class SceneClassifier(nn.Module):
    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.trunk = nn.Sequential(block(3, 32), nn.AvgPool2d(2), block(32, 64), nn.AvgPool2d(2), block(64, 64))
        self.proj = nn.Linear(64 * 8 * 8, FEATURE_DIM)
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURE_DIM, len(v)) for k, v in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: float (N, 3, H, W) in [0, 1]; resized to 32x32 when another size is given."""
        if images.shape[-1] != 32 or images.shape[-2] != 32:
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
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
    return {k: torch.tensor([s.labels()[k] for s in scenes]) for k in ATTRIBUTES}


def train_classifier(steps: int = 1500, batch: int = 128, pool_size: int = 20000, seed: int = 0,
                     lr: float = 2e-3) -> SceneClassifier:
    """Train on a pool of rendered scenes with light pixel noise (so it is robust to generated images)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images_np, scenes = sample_scenes(pool_size, seed=seed + 2000)
    images = to_unit_tensor(images_np)
    labels = label_tensor(scenes)
    model = SceneClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(range(steps), desc="classifier")
    for step in bar:
        idx = torch.randint(0, pool_size, (batch,), generator=gen)
        x = images[idx]
        # augmentation: pixel noise and a slight blur-ish contrast jitter, as generated images are imperfect
        x = (x + 0.06 * torch.rand(batch, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


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
