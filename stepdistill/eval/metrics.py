"""Quality metrics: toy prompt accuracy and toy-FID on the embedded world; Inception FID and CLIP score
for real models when their weights are on disk.

- *prompt accuracy*: the share of images whose shape, shape colour and background colour (as read by
  the toy classifier) all match the prompt. Random images score about 1/72.
- *toy-FID*: the Fréchet distance (Heusel et al. 2017, eq. 6) between Gaussian fits of the toy
  classifier's 128-d features of generated images and of real rendered scenes.
- *FID* with Inception-v3 features needs ``torch-fidelity``'s FID Inception weights as a local file;
  *CLIP score* (Hessel et al. 2021) needs a local CLIP model directory. Neither is downloaded: when the
  weights are missing the functions say so, and what to pass.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..toy.classifier import load_classifier, to_unit_tensor
from ..toy.scenes import ATTRIBUTES, parse_caption, sample_scenes

PROMPT_ATTRIBUTES = ("shape", "color", "background")  # what "matches the prompt" means
REFERENCE_SEED = 777


class MetricUnavailable(RuntimeError):
    """A metric's weights or package are not available locally."""


@lru_cache(maxsize=1)
def toy_classifier():
    return load_classifier()


@torch.no_grad()
def classify(images, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Predicted class index per attribute for each image."""
    x = to_unit_tensor(images)
    model = toy_classifier()
    outs = {k: [] for k in ATTRIBUTES}
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        for k in ATTRIBUTES:
            outs[k].append(logits[k].argmax(1).numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def prompt_accuracy(images, prompts: list[str]) -> dict[str, float]:
    """Share of images matching their prompt in shape, colour and background (``prompt_accuracy``),
    plus the accuracy of each of the five attributes separately (``acc_<attribute>``)."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    predicted = classify(images)
    wanted = [parse_caption(p).labels() for p in prompts]
    per_attr = {k: predicted[k] == np.array([w[k] for w in wanted]) for k in ATTRIBUTES}
    match = np.all([per_attr[k] for k in PROMPT_ATTRIBUTES], axis=0)
    out = {"prompt_accuracy": float(match.mean())}
    out.update({f"acc_{k}": float(v.mean()) for k, v in per_attr.items()})
    return out


@torch.no_grad()
def toy_features(images, batch_size: int = 256) -> np.ndarray:
    x = to_unit_tensor(images)
    model = toy_classifier()
    return torch.cat([model.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) (FID, Heusel et al. 2017 eq. 6).

    The trace of the matrix square root is taken as the sum of square roots of the eigenvalues of
    S_a^{1/2} S_b S_a^{1/2}, which is symmetric PSD, so no complex-valued sqrtm is needed."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a, s_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ s_b @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


@lru_cache(maxsize=4)
def reference_features(n: int = 2000, seed: int = REFERENCE_SEED) -> np.ndarray:
    images, _ = sample_scenes(n, seed=seed)
    return toy_features(images)


def toy_fid(images, n_reference: int = 2000) -> float:
    """Fréchet distance between toy-classifier features of ``images`` and of ``n_reference`` real scenes."""
    if len(images) < 2:
        raise ValueError("toy-FID needs at least 2 images (use 100+ for a stable figure)")
    return frechet_distance(toy_features(images), reference_features(n_reference))


def toy_metrics(images, prompts: list[str]) -> dict[str, float]:
    return {**prompt_accuracy(images, prompts), "toy_fid": toy_fid(images)}


# ---- real metrics, when their weights are on disk -------------------------------------------------

def inception_fid(images, reference_images, weights_path: str | Path | None = None) -> float:
    """FID with the standard FID Inception-v3 (torch-fidelity's port of the TF graph), from a local
    weights file (``pt_inception-2015-12-05-6726825d.pth``)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import (
            FeatureExtractorInceptionV3,  # optional: FID only
        )
    except ImportError as e:
        raise MetricUnavailable("Inception FID needs the `torch-fidelity` package: pip install torch-fidelity") from e
    if weights_path is None or not Path(weights_path).exists():
        raise MetricUnavailable(
            f"Inception FID needs the FID Inception weights as a local file (got {weights_path!r}); download "
            "pt_inception-2015-12-05-6726825d.pth on a machine with internet access and pass its path")
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(weights_path)).eval()

    @torch.no_grad()
    def feats(imgs):
        x = (to_unit_tensor(imgs) * 255).round().to(torch.uint8)
        return torch.cat([extractor(x[i:i + 64])[0] for i in range(0, len(x), 64)]).double().numpy()

    return frechet_distance(feats(images), feats(reference_images))


def clip_score(images, prompts: list[str], clip_model_path: str | Path | None) -> float:
    """CLIP score: 100 * mean max(cos(E_img, E_txt), 0) (Hessel et al. 2021, eq. 1 with w=100 as
    torchmetrics), from a local CLIP model directory (e.g. a saved openai/clip-vit-large-patch14)."""
    if clip_model_path is None or not Path(clip_model_path).is_dir():
        raise MetricUnavailable(
            f"CLIP score needs a local CLIP model directory (got {clip_model_path!r}); save one with "
            "CLIPModel.from_pretrained(...).save_pretrained(DIR) (and its processor) where a hub is reachable")
    from transformers import CLIPModel, CLIPProcessor  # optional: CLIP score only (its image processor warns at import)

    model = CLIPModel.from_pretrained(str(clip_model_path), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(clip_model_path), local_files_only=True)
    x = to_unit_tensor(images)
    pil = [_to_pil(im) for im in x]
    with torch.no_grad():
        inputs = processor(text=prompts, images=pil, return_tensors="pt", padding=True, truncation=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return float(100 * cos.clamp(min=0).mean())


def _to_pil(chw: torch.Tensor):
    return Image.fromarray((chw.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))
