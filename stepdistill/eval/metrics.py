"""Quality metrics: toy prompt accuracy, conditional toy-FID and precision/recall on the embedded world;
Inception FID and CLIP score for real models when their weights are on disk.

- *prompt accuracy*: the share of images in which the toy classifier reads back **every** attribute the
  prompt names (count, colour and shape always; size, position, background colour and texture when
  named). ``acc_<attribute>`` is each attribute's accuracy over the prompts that name it.
- *toy-FID*: the Fréchet distance (Heusel et al. 2017, eq. 6) between Gaussian fits of the toy
  classifier's 64-d features of the generated images and of a reference drawn from the *conditional*
  distribution of the same prompts (``REFERENCE_PER_PROMPT`` renders per prompt, the attributes a
  prompt leaves open drawn freely), so a sampler is scored against what each prompt allows.
- *precision / recall* (Kynkäänniemi et al. 2019, eqs. 1-2, k = 3): the share of generated images inside
  the k-NN manifold of the reference features, and of reference images inside the generated manifold.
  Blur (mode averaging) lowers precision; mode collapse lowers recall.
- ``real``: the classifier's mean probability that an image is a scene rather than a blend of scenes.
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
from ..toy.scenes import ATTRIBUTES, parse_caption, reference_scenes, sample_scenes

REFERENCE_SEED = 777
REFERENCE_PER_PROMPT = 5
PR_NEIGHBOURS = 3


class MetricUnavailable(RuntimeError):
    """A metric's weights or package are not available locally."""


@lru_cache(maxsize=1)
def toy_classifier():
    return load_classifier()


@torch.no_grad()
def judge(images, batch_size: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One pass of the toy classifier: its features (float64) and its predictions (see :func:`classify`)."""
    x = to_unit_tensor(images)
    model = toy_classifier()
    feats, outs = [], {k: [] for k in (*ATTRIBUTES, "real")}
    for i in range(0, len(x), batch_size):
        f = model.features(x[i:i + batch_size])
        feats.append(f)
        for k, head in model.heads.items():
            logits = head(f)
            outs[k].append((logits.softmax(1)[:, 1] if k == "real" else logits.argmax(1)).numpy())
    return torch.cat(feats).double().numpy(), {k: np.concatenate(v) for k, v in outs.items()}


def classify(images, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Predicted class index per attribute for each image, and ``real``: the probability of being a scene."""
    return judge(images, batch_size)[1]


def prompt_accuracy(images, prompts: list[str], predicted: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Share of images in which every attribute the prompt names is read back (``prompt_accuracy``), each
    attribute's accuracy over the prompts naming it (``acc_<attribute>``), and the mean ``real`` probability.
    ``predicted``: :func:`classify`'s output for ``images`` when already computed."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    if predicted is None:
        predicted = classify(images)
    specs = [parse_caption(p) for p in prompts]
    match = np.ones(len(prompts), dtype=bool)
    out = {}
    for k in ATTRIBUTES:
        named = np.array([k in s for s in specs])
        wanted = np.array([ATTRIBUTES[k].index(s[k]) if k in s else -1 for s in specs])
        right = predicted[k] == wanted
        match &= right | ~named
        if named.any():
            out[f"acc_{k}"] = float(right[named].mean())
    return {"prompt_accuracy": float(match.mean()), **out, "real": float(predicted["real"].mean())}


def toy_features(images, batch_size: int = 256) -> np.ndarray:
    return judge(images, batch_size)[0]


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


def precision_recall(feats_gen: np.ndarray, feats_ref: np.ndarray, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1-2): a sample is covered by a set when it
    lies within the distance to the k-th nearest neighbour of some member of that set."""
    def radii(feats):
        d = np.sqrt(((feats[:, None] - feats[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(points, manifold):
        d = np.sqrt(((points[:, None] - manifold[None]) ** 2).sum(-1))
        return float((d <= radii(manifold)[None]).any(1).mean())

    return covered(feats_gen, feats_ref), covered(feats_ref, feats_gen)


@lru_cache(maxsize=8)
def _reference_features(prompts: tuple | None, n: int, seed: int) -> np.ndarray:
    if prompts is None:
        images, _ = sample_scenes(n, seed=seed)
    else:
        images = reference_scenes(list(prompts), n, seed=seed)
    return toy_features(images)


def reference_features(prompts: list[str] | None = None, per_prompt: int = REFERENCE_PER_PROMPT,
                       seed: int = REFERENCE_SEED) -> np.ndarray:
    """Features of ``per_prompt`` renders of each prompt (caption-major); with no prompts, of 2000 scenes
    from the world's prior."""
    return _reference_features(None if prompts is None else tuple(prompts), 2000 if prompts is None else per_prompt,
                               seed)


def toy_fid(images, prompts: list[str] | None = None) -> float:
    """Fréchet distance between toy-classifier features of ``images`` and of the conditional reference of
    ``prompts`` (of the world's prior when no prompts are given)."""
    if len(images) < 2:
        raise ValueError("toy-FID needs at least 2 images (use 100+ for a stable figure)")
    return frechet_distance(toy_features(images), reference_features(prompts))


def toy_metrics(images, prompts: list[str]) -> dict[str, float]:
    """Prompt accuracy (every named attribute), conditional toy-FID, precision and recall of ``images``
    generated one per prompt. FID, precision and recall need at least 2 images (``None`` below that)."""
    feats, predicted = judge(images)  # one classifier pass for accuracy, FID and precision/recall
    out = prompt_accuracy(images, prompts, predicted)
    if len(images) < 2:
        return {**out, "toy_fid": None, "precision": None, "recall": None}
    ref = reference_features(prompts)
    out["toy_fid"] = frechet_distance(feats, ref)
    one_per_prompt = ref[::REFERENCE_PER_PROMPT]  # as many reference points as generated ones
    out["precision"], out["recall"] = precision_recall(feats, one_per_prompt)
    return out


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
