"""Cache VAE latents and text embeddings once, so a training step never runs the VAE encoder or the
text encoder(s). Built by ``stepdistill cache build`` (rank-aware, resumable) or on a training run's first use.

Format (version 3): a directory of shards plus ``manifest.json``. The examples are cut, in source order, into shards
of ``shard_size`` consecutive examples; shard ``j`` is ``shard-JJJJJ.safetensors`` holding, for its rows:
- ``mean`` and ``logvar`` of the VAE posterior in float16 (each step still draws a fresh ``latent_dist.sample()``,
  as the reference recipe: ``mean + exp(logvar / 2) * noise``), ``caption_index`` (int32) into
- ``prompt_embeds`` (float16): the shard's own distinct captions' embeddings (and ``pooled`` for SDXL), and
  ``uncond_prompt_embeds`` (/ ``uncond_pooled``): the empty prompt (classifier-free guidance);
- for SDXL, ``time_ids`` (original size, crop, target size).

Each shard's header carries its fingerprint -- a hash of the model, resolution, shard index and each of its examples'
name, caption and stamp (an image file's size and mtime, from ``stat``) -- and is its done marker: a builder skips a
shard whose file carries the fingerprint it would write, so a killed build continues where it stopped, and rank ``r``
of ``w`` encodes the shards ``j`` with ``j % w == r`` (several workers can fill one directory). The fingerprints are
computed streaming over the source: nothing holds the dataset. When every shard is there, ``manifest.json`` (the
shard list with fingerprints and row counts, the cache fingerprint = a hash of the shard fingerprints) is written by
whichever worker finds the set complete. Reading (:class:`LatentCache`) memory-maps each shard (numpy views of the
safetensors layout, advised for random access) and reads single rows: no process ever concatenates the cache.

A cache cannot be stale or mixed: a builder deletes the manifest before it replaces any shard, writes every shard
atomically, and writes the manifest last; loading checks every shard's fingerprint against the manifest and the row
counts and caption indices (a cache that fails this raises :class:`DataError` naming the fix; a build rebuilds it).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..atomic import atomic_save_file, atomic_write_json
from ..errors import DataError
from ..models.family import encode_prompts, family_of, sdxl_time_ids
from .sources import Example, check_resolution, preprocess

CACHE_VERSION = 3  # 3: sharded build with per-shard fingerprints, float16 mean/logvar, per-shard caption tables
SHARD_SIZE = 1024
ROW_KEYS = ("mean", "logvar", "caption_index")


def shard_name(j: int) -> str:
    return f"shard-{j:05d}.safetensors"


@dataclass
class CachePlan:
    """What a pass over the source found: every shard's fingerprint and row count, and the cache's settings."""
    model_id: str
    resolution: int
    shards: list[dict] = field(default_factory=list)  # {"name", "fingerprint", "rows"}
    encoded: list[str] = field(default_factory=list)  # the shards this worker (re)wrote
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    shard_size: int = SHARD_SIZE

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{CACHE_VERSION}|{self.model_id}|{self.resolution}".encode())
        for s in self.shards:
            h.update(f"{s['name']}={s['fingerprint']}:{s['rows']}\n".encode())
        return h.hexdigest()[:16]

    @property
    def num_examples(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def manifest(self) -> dict:
        return {"version": CACHE_VERSION, "fingerprint": self.fingerprint, "model": self.model_id,
                "resolution": self.resolution, "num_examples": self.num_examples, "shards": self.shards,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor, "shard_size": self.shard_size}


def _chunks(examples: Iterable[Example], size: int) -> Iterator[list[Example]]:
    it = iter(examples)
    while chunk := list(islice(it, size)):
        yield chunk


def _shard_fingerprint(model_id: str, resolution: int, j: int, chunk: list[Example]) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|{model_id}|{resolution}|{j}".encode())
    for ex in chunk:
        h.update(b"\0".join(x.encode() for x in (ex.name, ex.caption, ex.stamp)) + b"\n")
    return h.hexdigest()[:16]


def stored_shard_size(cache_dir: str | Path) -> int | None:
    """The shard size of the cache (or of the partial build) in ``cache_dir``, so that a later build -- training's,
    or a resumed ``cache build`` -- cuts the examples the same way; None when there is none."""
    cache_dir = Path(cache_dir)
    size = _manifest(cache_dir).get("shard_size")
    if size is None:
        try:
            with safe_open(str(cache_dir / shard_name(0)), framework="np") as f:
                size = (f.metadata() or {}).get("shard_size")
        except (SafetensorError, OSError):
            return None
    try:
        return int(size) if size is not None and int(size) > 0 else None
    except (TypeError, ValueError):
        return None


def _check_shard(path: Path, fingerprint: str, rows: int) -> str | None:
    """Why the shard file at ``path`` is not a complete shard with ``fingerprint`` and ``rows`` rows (None: it is).
    Only the header is read."""
    try:
        with safe_open(str(path), framework="np") as f:
            found = (f.metadata() or {}).get("fingerprint")
            if found != fingerprint:
                return f"belongs to another cache build (fingerprint {found}, expected {fingerprint})"
            keys = set(f.keys())
            if not set(ROW_KEYS) | {"prompt_embeds", "uncond_prompt_embeds"} <= keys:
                return f"lacks tensors (has {sorted(keys)})"
            for k in (*ROW_KEYS, *(["time_ids"] if "time_ids" in keys else [])):
                n = f.get_slice(k).get_shape()[0]
                if n != rows:
                    return f"holds {n} rows, its manifest says {rows}"
    except FileNotFoundError:
        return "is missing"
    except (SafetensorError, OSError) as e:
        return f"is unreadable ({type(e).__name__}: {e})"
    return None


@torch.no_grad()
def _encode_shard(pipe, chunk: list[Example], resolution: int, batch_size: int, desc: str) -> dict[str, torch.Tensor]:
    vae = pipe.vae
    means, logvars = [], []
    for i in tqdm(range(0, len(chunk), batch_size), desc=desc, leave=False):
        pixels = torch.from_numpy(np.stack([preprocess(ex.load_image(), resolution) for ex in chunk[i:i + batch_size]]))
        post = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        means.append(post.mean.half().cpu())
        logvars.append(post.logvar.half().cpu())
    captions = sorted({ex.caption for ex in chunk})
    row = {c: i for i, c in enumerate(captions)}
    emb = encode_prompts(pipe, captions + [""], batch_size=batch_size)
    out = {"mean": torch.cat(means), "logvar": torch.cat(logvars),
           "caption_index": torch.tensor([row[ex.caption] for ex in chunk], dtype=torch.int32),
           "prompt_embeds": emb["prompt_embeds"][:-1].half(), "uncond_prompt_embeds": emb["prompt_embeds"][-1:].half()}
    if "pooled" in emb:
        out["pooled"], out["uncond_pooled"] = emb["pooled"][:-1].half(), emb["pooled"][-1:].half()
    if family_of(pipe).name == "sdxl":  # original size, crop top-left, target size (square, uncropped)
        out["time_ids"] = sdxl_time_ids(resolution, resolution).expand(len(chunk), -1).clone()
    return {k: v.contiguous() for k, v in out.items()}


def build_cache(pipe, examples: Iterable[Example], resolution: int, cache_dir: str | Path, model_id: str = "",
                batch_size: int = 64, shard_size: int | None = None, shard_index: int = 0, num_shards: int = 1,
                progress: bool = True) -> CachePlan:
    """Encode this worker's shards (``j % num_shards == shard_index``) of ``examples`` into ``cache_dir``, skipping
    shards already done; write the manifest when every shard is there. Returns the plan of the whole cache.
    ``shard_size``: examples per shard (default: that of the cache already in ``cache_dir``, else SHARD_SIZE)."""
    if not 0 <= shard_index < num_shards:
        raise DataError(f"shard index {shard_index} is outside 0..{num_shards - 1}; pass --shard-index below "
                        "--num-shards")
    cache_dir = Path(cache_dir)
    shard_size = shard_size or stored_shard_size(cache_dir) or SHARD_SIZE
    unet = pipe.unet
    check_resolution(resolution, pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1))
    plan = CachePlan(model_id, resolution, scaling_factor=float(pipe.vae.config.scaling_factor),
                     shift_factor=float(getattr(pipe.vae.config, "shift_factor", None) or 0.0), shard_size=shard_size)
    manifest_path = cache_dir / "manifest.json"
    bar = None  # shown from the first shard on (a source that fails at once prints only its error)
    for j, chunk in enumerate(_chunks(examples, shard_size)):
        if bar is None:
            bar = tqdm(desc=f"latent cache (worker {shard_index} of {num_shards})", unit="shard", disable=not progress)
        name, fp = shard_name(j), _shard_fingerprint(model_id, resolution, j, chunk)
        plan.shards.append({"name": name, "fingerprint": fp, "rows": len(chunk)})
        if j % num_shards != shard_index:
            continue
        why = _check_shard(cache_dir / name, fp, len(chunk))
        if why is not None:
            if not why.startswith(("is missing", "belongs to another")):  # a damaged shard, not a stale one
                warnings.warn(f"rebuilding the latent cache shard {cache_dir / name}: it {why}", UserWarning,
                              stacklevel=2)
            cache_dir.mkdir(parents=True, exist_ok=True)
            manifest_path.unlink(missing_ok=True)  # invalidate before any file is replaced
            tensors = _encode_shard(pipe, chunk, resolution, batch_size, f"encoding shard {j}")
            atomic_save_file(tensors, cache_dir / name, metadata={"fingerprint": fp, "rows": str(len(chunk)),
                                                                        "shard_size": str(shard_size)})
            plan.encoded.append(name)
        bar.update(1)
    if bar is None:
        raise DataError("no training examples to precompute; check train_data")
    bar.close()
    finish_cache(cache_dir, plan)
    return plan


def finish_cache(cache_dir: str | Path, plan: CachePlan) -> bool:
    """Write the manifest of ``plan`` (and delete shards of older builds) if every shard is done; False if not."""
    cache_dir = Path(cache_dir)
    if _manifest(cache_dir).get("fingerprint") == plan.fingerprint:
        return True
    if any(_check_shard(cache_dir / s["name"], s["fingerprint"], s["rows"]) for s in plan.shards):
        return False
    names = {s["name"] for s in plan.shards}
    for stale in [*cache_dir.glob("shard-*.safetensors"), *cache_dir.glob("latents-*.safetensors"),
                  cache_dir / "embeddings.safetensors"]:  # later shards of a larger build; version 2 files
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    atomic_write_json(cache_dir / "manifest.json", plan.manifest())  # last: the cache is valid from here on
    return True


def precompute(pipe, examples: Iterable[Example], resolution: int, cache_dir: str | Path, model_id: str = "",
               batch_size: int = 64, shard_size: int | None = None) -> LatentCache:
    """Build (or reuse, or finish) the whole cache of ``examples`` in one process and open it."""
    plan = build_cache(pipe, examples, resolution, cache_dir, model_id, batch_size, shard_size)
    return load_cache(cache_dir, expect=plan.fingerprint)


def _manifest(cache_dir: Path) -> dict:
    try:
        data = json.loads((cache_dir / "manifest.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64}


class _MappedShard:
    """One shard file memory-mapped read-only, its tensors as zero-copy numpy views (safetensors layout: an 8-byte
    header length, the JSON header, the data). The map is advised for random access (``MADV_RANDOM``): a row read
    faults in that row's pages only, not the kernel's read-ahead window, so a training process's resident set grows
    with the rows it reads, not with the size of the cache."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(self.map, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            self.map.madvise(mmap.MADV_RANDOM)
        (length,) = struct.unpack("<Q", self.map[:8])
        header = json.loads(self.map[8:8 + length])
        self.tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = np.dtype(_NUMPY_DTYPES[info["dtype"]])
            self.tensors[name] = np.frombuffer(self.map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                               offset=8 + length + begin).reshape(info["shape"])


class LatentCache:
    """A cache directory read per row from memory-mapped shards. :meth:`row` gives one example as the training
    batch holds it (float32): ``mean``, ``std``, ``encoder_hidden_states`` and, for SDXL, ``text_embeds`` and
    ``time_ids``; :attr:`uncond` the empty prompt's ``encoder_hidden_states`` (/ ``text_embeds``)."""

    def __init__(self, cache_dir: Path, manifest: dict):
        self.cache_dir, self.manifest = cache_dir, manifest
        self.shards = [s["name"] for s in manifest["shards"]]
        self.offsets = np.cumsum([0] + [int(s["rows"]) for s in manifest["shards"]])
        self.scaling_factor = float(manifest["scaling_factor"])
        self.shift_factor = float(manifest.get("shift_factor", 0.0))
        self._handles: dict[int, _MappedShard] = {}
        t = self.handle(0).tensors
        self.uncond = {"encoder_hidden_states": torch.from_numpy(t["uncond_prompt_embeds"][0].astype(np.float32))}
        if "uncond_pooled" in t:
            self.uncond["text_embeds"] = torch.from_numpy(t["uncond_pooled"][0].astype(np.float32))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self):  # DataLoader workers map the shards themselves
        return {**self.__dict__, "_handles": {}}

    def handle(self, j: int) -> _MappedShard:
        """Shard ``j``, memory-mapped on first use."""
        if j not in self._handles:
            self._handles[j] = _MappedShard(self.cache_dir / self.shards[j])
        return self._handles[j]

    def row(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of a cache of {len(self)}")
        j = int(np.searchsorted(self.offsets, i, side="right")) - 1
        t, k = self.handle(j).tensors, i - int(self.offsets[j])

        def get(name, r):
            return torch.from_numpy(t[name][r].astype(np.float32))

        caption = int(t["caption_index"][k])
        item = {"mean": get("mean", k), "std": torch.exp(0.5 * get("logvar", k)),
                "encoder_hidden_states": get("prompt_embeds", caption)}
        if "pooled" in t:
            item["text_embeds"] = get("pooled", caption)
        if "time_ids" in t:
            item["time_ids"] = get("time_ids", k)
        return item


def load_cache(cache_dir: str | Path, expect: str | None = None) -> LatentCache:
    """The cache in ``cache_dir`` (memory-mapped); a missing, unreadable or inconsistent one (files of different
    builds, row counts that disagree, caption indices outside a shard's table) raises :class:`DataError`.
    ``expect``: the fingerprint the cache must have."""
    cache_dir = Path(cache_dir)
    fix = f"; delete {cache_dir} or run `stepdistill cache build` (training rebuilds it)"
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text())
        if manifest.get("version") != CACHE_VERSION:
            raise ValueError(f"version {manifest.get('version')}, expected {CACHE_VERSION}")
        shards, num_examples = manifest["shards"], int(manifest["num_examples"])
        _ = [(s["name"], s["fingerprint"], int(s["rows"])) for s in shards]  # each entry well-formed
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"latent cache {cache_dir} has no readable manifest ({type(e).__name__}: {e}){fix}") from None
    if expect is not None and manifest.get("fingerprint") != expect:
        raise DataError(f"latent cache {cache_dir} was built for other data (fingerprint {manifest.get('fingerprint')}"
                        f", expected {expect}){fix}")
    if not shards or sum(int(s["rows"]) for s in shards) != num_examples:
        raise DataError(f"latent cache {cache_dir}: its shards hold {sum(int(s['rows']) for s in shards)} rows, its "
                        f"manifest says {num_examples}{fix}")
    for s in shards:
        why = _check_shard(cache_dir / s["name"], s["fingerprint"], int(s["rows"]))
        if why is None:
            with safe_open(str(cache_dir / s["name"]), framework="np") as f:
                index, table = f.get_tensor("caption_index"), f.get_slice("prompt_embeds").get_shape()[0]
            if len(index) and (int(index.min()) < 0 or int(index.max()) >= table):
                why = f"has caption indices outside its {table} captions"
        if why is not None:
            raise DataError(f"cache shard {cache_dir / s['name']} {why}{fix}")
    return LatentCache(cache_dir, manifest)
