"""Cache VAE latents and text embeddings once, so a training step never runs the VAE encoder or the
text encoder(s).

The cache is a directory of safetensors shards plus ``manifest.json``:
- ``latents-NNNNN.safetensors``: ``mean``/``std`` of the VAE posterior (so each step still draws a
  fresh ``latent_dist.sample()``, as the reference recipe), ``caption_index`` into the caption table,
  and for SDXL ``time_ids`` (original size, crop, target size);
- ``embeddings.safetensors``: ``prompt_embeds`` per distinct caption (and ``pooled`` for SDXL), the
  empty prompt last (the unconditional embedding for classifier-free guidance).
The manifest records the model, resolution and a fingerprint of the examples (name, caption, and each image
file's size and modification time -- from ``stat``, never by holding the dataset in memory); a cache whose manifest
does not match the request is rebuilt, a matching one is reused.

A cache cannot be stale or mixed: a rebuild deletes the manifest before it replaces any file, writes every shard
atomically with the fingerprint in its header, and writes the manifest last; loading checks that every file
carries the manifest's fingerprint and that the row counts agree (a cache that fails this is rebuilt).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..atomic import atomic_save_file, atomic_write_json
from ..errors import DataError
from ..models.family import encode_prompts, family_of, sdxl_time_ids
from .sources import Example, check_resolution, preprocess

CACHE_VERSION = 2  # 2: image size/mtime in the fingerprint, fingerprinted shards


@dataclass
class LatentCache:
    """In-memory view of a cache directory."""
    mean: torch.Tensor
    std: torch.Tensor
    caption_index: torch.Tensor
    prompt_embeds: torch.Tensor  # (num_captions + 1, seq, dim); the last row is the empty prompt
    captions: list[str]
    scaling_factor: float
    shift_factor: float = 0.0
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self):
        return len(self.mean)

    @property
    def uncond_index(self) -> int:
        return len(self.prompt_embeds) - 1

    def latents(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A fresh posterior sample for examples ``idx``, scaled as the UNet sees latents."""
        mean, std = self.mean[idx], self.std[idx]
        z = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return (z - self.shift_factor) * self.scaling_factor

    def conditioning(self, caption_idx: torch.Tensor) -> dict:
        """UNet keyword arguments for the given caption rows (``encoder_hidden_states`` and, for SDXL,
        ``added_cond_kwargs``)."""
        cond = {"encoder_hidden_states": self.prompt_embeds[caption_idx]}
        if self.pooled is not None:
            cond["added_cond_kwargs"] = {"text_embeds": self.pooled[caption_idx], "time_ids": None}
        return cond


def _fingerprint(model_id: str, resolution: int, examples: list[Example]) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|{model_id}|{resolution}".encode())
    for ex in examples:
        h.update(b"\0".join(x.encode() for x in (ex.name, ex.caption, ex.stamp)) + b"\n")
    return h.hexdigest()[:16]


@torch.no_grad()
def precompute(pipe, examples: list[Example], resolution: int, cache_dir: str | Path, model_id: str = "",
               batch_size: int = 64, shard_size: int = 8192) -> LatentCache:
    """Encode ``examples`` with ``pipe``'s VAE and text encoder(s) into ``cache_dir`` (or reuse a matching cache)."""
    if not examples:
        raise DataError("no training examples to precompute; check train_data")
    cache_dir = Path(cache_dir)
    unet = pipe.unet
    multiple = pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    check_resolution(resolution, multiple)
    fingerprint = _fingerprint(model_id, resolution, examples)
    manifest_path = cache_dir / "manifest.json"
    if _manifest_fingerprint(manifest_path) == fingerprint:
        try:
            return load_cache(cache_dir)
        except DataError as e:
            warnings.warn(f"rebuilding the latent cache: {e}", UserWarning, stacklevel=2)
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # invalidate before any file is replaced
    header = {"fingerprint": fingerprint}
    captions = sorted({ex.caption for ex in examples})
    caption_to_row = {c: i for i, c in enumerate(captions)}
    emb = encode_prompts(pipe, captions + [""])
    atomic_save_file(emb, cache_dir / "embeddings.safetensors", metadata=header)
    vae = pipe.vae
    is_sdxl = family_of(pipe).name == "sdxl"
    shards = []
    for s in range(0, len(examples), shard_size):
        part = examples[s:s + shard_size]
        means, stds = [], []
        for i in tqdm(range(0, len(part), batch_size), desc=f"encoding latents (shard {len(shards)})", leave=False):
            pixels = torch.from_numpy(np.stack([preprocess(ex.load_image(), resolution) for ex in part[i:i + batch_size]]))
            post = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
            means.append(post.mean.float().cpu())
            stds.append(post.std.float().cpu())
        tensors = {"mean": torch.cat(means), "std": torch.cat(stds),
                   "caption_index": torch.tensor([caption_to_row[ex.caption] for ex in part])}
        if is_sdxl:  # original size, crop top-left, target size (square, uncropped)
            tensors["time_ids"] = sdxl_time_ids(resolution, resolution).expand(len(part), -1).clone()
        name = f"latents-{len(shards):05d}.safetensors"
        atomic_save_file(tensors, cache_dir / name, metadata=header)
        shards.append(name)
    for stale in cache_dir.glob("latents-*.safetensors"):
        if stale.name not in shards:
            stale.unlink()
    manifest = {"version": CACHE_VERSION, "fingerprint": fingerprint, "model": model_id, "resolution": resolution,
                "num_examples": len(examples), "shards": shards, "captions": captions,
                "scaling_factor": float(vae.config.scaling_factor),
                "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0)}
    atomic_write_json(manifest_path, manifest)  # last: the cache is valid from here on
    return load_cache(cache_dir)


def _manifest_fingerprint(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _read(path: Path, fingerprint: str, what: str) -> dict[str, torch.Tensor]:
    """The tensors of one cache file, which must carry ``fingerprint`` in its header."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            found = (f.metadata() or {}).get("fingerprint")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not iterable
    except (SafetensorError, OSError) as e:
        raise DataError(f"{what} {path} is unreadable ({type(e).__name__}: {e})") from None
    if found != fingerprint:
        raise DataError(f"{what} {path} belongs to another cache build (fingerprint {found}, manifest {fingerprint})")
    return tensors


def load_cache(cache_dir: str | Path) -> LatentCache:
    """The cache in ``cache_dir``; a missing, unreadable or inconsistent one (files of different builds, row
    counts that disagree) raises :class:`DataError`."""
    cache_dir = Path(cache_dir)
    fix = f"; delete {cache_dir} (training rebuilds it)"
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text())
        fingerprint, shards, captions = manifest["fingerprint"], manifest["shards"], manifest["captions"]
        num_examples = int(manifest["num_examples"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"latent cache {cache_dir} has no readable manifest ({type(e).__name__}: {e}){fix}") from None
    try:
        parts = [_read(cache_dir / s, fingerprint, "cache shard") for s in shards]
        emb = _read(cache_dir / "embeddings.safetensors", fingerprint, "cache embeddings")
        if not parts or any(not {"mean", "std", "caption_index"} <= p.keys() for p in parts):
            raise DataError(f"latent cache {cache_dir}: shards without mean/std/caption_index")
        rows = [len(p["mean"]) for p in parts]
        bad = [s for s, p, n in zip(shards, parts, rows) if any(len(t) != n for t in p.values())]
        if bad:
            raise DataError(f"cache shard {cache_dir / bad[0]}: its tensors have different row counts")
        if sum(rows) != num_examples:
            raise DataError(f"latent cache {cache_dir} holds {sum(rows)} rows, its manifest says {num_examples}")
        n_emb = len(captions) + 1
        if len(emb["prompt_embeds"]) != n_emb or ("pooled" in emb and len(emb["pooled"]) != n_emb):
            raise DataError(f"cache embeddings {cache_dir / 'embeddings.safetensors'} hold "
                            f"{len(emb['prompt_embeds'])} rows for {len(captions)} captions (+1 empty)")
        caption_index = torch.cat([p["caption_index"] for p in parts])
        if len(caption_index) and (int(caption_index.min()) < 0 or int(caption_index.max()) >= len(captions)):
            raise DataError(f"latent cache {cache_dir}: caption indices outside the {len(captions)} captions")
    except DataError as e:
        raise DataError(f"{e}{fix}") from None
    return LatentCache(
        mean=torch.cat([p["mean"] for p in parts]), std=torch.cat([p["std"] for p in parts]),
        caption_index=caption_index, prompt_embeds=emb["prompt_embeds"],
        captions=captions, scaling_factor=manifest["scaling_factor"],
        shift_factor=manifest.get("shift_factor", 0.0), pooled=emb.get("pooled"),
        time_ids=torch.cat([p["time_ids"] for p in parts]) if "time_ids" in parts[0] else None)
