"""Coupling sets on disk: writing shards and manifests, and reading a finished set for training.

A coupling is a (noise, data) pair of a teacher's ODE plus its window-boundary states (produced by
:mod:`stepdistill.methods.reflow_couplings`). Conventions: diffusers' flow convention (``s = 1`` noise,
``z = (1 - s) x0 + s eps``, ``v = eps - x0``).

Storage (``out_dir``)
---------------------
* ``manifest.json``: the arguments (checked on every rerun), the prompts table, the window boundaries and the
  full step grid, the shard list and the completed shards, the conventions in words.
* ``embeddings.safetensors``: ``prompt_embeds`` per distinct prompt (first-appearance order) and the
  unconditional embedding as the last row (the empty prompt, or zeros where the pipeline uses zeros:
  SDXL's ``force_zeros_for_empty_prompt``); ``pooled`` for SDXL/SD3/FLUX. Computed with ``pipe.encode_prompt``
  (the pipeline's default ``max_sequence_length``), so training never runs a text encoder.
* ``couplings-NNNNN.safetensors`` (``shard_size`` couplings each), per coupling ``i``:

  - ``noise`` ``(C, H, W)``: the Gaussian draw ``torch.randn(generator=torch.Generator().manual_seed(seed + i))``
    (the ``latents`` a diffusers pipeline would start from -- for ``FluxPipeline`` after
    :func:`pack_flux_latents`; also :func:`stepdistill.sampling.generate`'s noise for image ``i``);
  - ``data`` ``(C, H, W)``: the ODE's endpoint at ``s = 0``, a clean latent as the UNet/VAE sees it (scaled by
    the VAE's ``scaling_factor``);
  - ``boundary_states`` ``(K + 1, C, H, W)``: the flow states ``z`` at ``sigma_boundaries[0..K]``; entry 0 is
    the start state (``n(sigma_max) * noise`` for VP, ``noise`` for flow teachers), entry K equals ``data``;
  - ``prompt_index`` (row of ``embeddings.safetensors``), ``seed`` (``seed + i``), ``guidance``, ``index``
    (``i``).

Every file is written to a temporary name and renamed into place. A run interrupted at any point resumes
with the same arguments, skipping finished shards; a manifest holding different arguments raises
:class:`CouplingArgumentsMismatch`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..atomic import atomic_save_file, atomic_write_json
from ..errors import CouplingArgumentsMismatch, CouplingError

COUPLINGS_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.safetensors"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CONVENTIONS = {
    "flow": "s=1 noise, s=0 data; z_s = (1-s) x0 + s eps; v = dz/ds = eps - x0",
    "noise": "torch.randn((1, C, H, W), generator=torch.Generator().manual_seed(seed + i)): the "
             "pipeline's initial latent (VP: x_T at the last training timestep; flow: z at s=1; FLUX: "
             "unpacked, FluxPipeline packs it into 2x2 patch tokens)",
    "boundary_states": "flow states z at sigma_boundaries (descending); [0] = start state "
                       "(VP: sqrt((1-s_max)^2+s_max^2) * noise), [K] = data",
    "data": "ODE endpoint at s=0, model latent space (VAE-scaled)",
    "prompt_index": "row of embeddings.safetensors; the last row is the unconditional embedding",
}


def prompts_table(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
    table, row, index = [], {}, []
    for p in prompts:
        if p not in row:
            row[p] = len(table)
            table.append(p)
        index.append(row[p])
    return table, torch.tensor(index, dtype=torch.long)


def prompts_sha256(prompts: list[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def check_args(manifest: dict, args: dict, out_dir: Path):
    old = manifest.get("args", {})
    diff = [k for k in sorted(set(old) | set(args)) if old.get(k) != args.get(k)]
    if diff:
        lines = "; ".join(f"{k}: on disk {old.get(k)!r}, requested {args.get(k)!r}" for k in diff)
        raise CouplingArgumentsMismatch(
            f"{out_dir} holds couplings generated with different arguments ({lines}). Re-run with the original "
            "arguments to resume that run, or pass a new output directory")


def shard_is_complete(path: Path, fingerprint: str, n: int) -> bool:
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return meta.get("fingerprint") == fingerprint and int(meta.get("count", -1)) == n
    except Exception:  # a foreign or damaged file: regenerate it
        return False


def shard_names(n_total: int, shard_size: int) -> list[str]:
    return [f"couplings-{j:05d}.safetensors" for j in range((n_total + shard_size - 1) // shard_size)]


def read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def write_manifest(out_dir: Path, manifest: dict):
    atomic_write_json(out_dir / MANIFEST, manifest)


def plan_shards(out_dir: Path, manifest: dict, names: list[str], n_total: int, shard_size: int,
                fingerprint: str) -> tuple[list[int], list[str]]:
    """``(todo, skipped)``: the shard numbers still to generate and the names already complete. A shard written
    before a crash but missing from the manifest's ``completed`` list is recognised by its header and recorded."""
    completed = set(manifest.get("completed", []))
    todo, skipped = [], []
    for j, name in enumerate(names):
        n = min(shard_size, n_total - j * shard_size)
        if name in completed and (out_dir / name).exists():
            skipped.append(name)
        elif shard_is_complete(out_dir / name, fingerprint, n):  # written, crashed before the manifest update
            skipped.append(name)
            completed.add(name)
        else:
            todo.append(j)
    if skipped and set(manifest.get("completed", [])) != completed:
        manifest["completed"] = [s for s in names if s in completed]
        write_manifest(out_dir, manifest)
    return todo, skipped


def write_shard(out_dir: Path, manifest: dict, name: str, tensors: dict, fingerprint: str, first_index: int):
    """Write one shard atomically, then record it as completed in the manifest."""
    n = len(tensors["index"])
    atomic_save_file(tensors, out_dir / name, metadata={"fingerprint": fingerprint, "count": str(n),
                                                        "first_index": str(first_index)})
    done = set(manifest.get("completed", [])) | {name}
    manifest["completed"] = [s for s in manifest["shards"] if s in done]
    write_manifest(out_dir, manifest)


def write_embeddings(out_dir: Path, emb: dict, fingerprint: str):
    atomic_save_file(emb, out_dir / EMBEDDINGS, metadata={"fingerprint": fingerprint})


def read_embeddings(out_dir: Path) -> dict:
    return load_file(str(out_dir / EMBEDDINGS))


# ----------------------------------------------------------------------------------------------------
# reading


class CouplingSet:
    """A finished couplings directory, read for training.

    ``boundary_states`` are held in memory when they fit in ``max_in_memory_bytes``, else read per batch from
    the (memory-mapped) shards."""

    def __init__(self, out_dir: str | Path, max_in_memory_bytes: int = 8 << 30):
        self.dir = Path(out_dir)
        path = self.dir / MANIFEST
        if not path.exists():
            raise CouplingError(f"no couplings at {self.dir} (no {MANIFEST}); generate them with "
                                "`stepdistill reflow couple --out DIR ...`")
        self.manifest = json.loads(path.read_text())
        missing = [s for s in self.manifest["shards"] if s not in set(self.manifest.get("completed", []))
                   or not (self.dir / s).exists()]
        if missing:
            raise CouplingError(f"couplings at {self.dir} are incomplete ({len(missing)} of "
                                f"{len(self.manifest['shards'])} shards missing, e.g. {missing[0]}); re-run the same "
                                "`stepdistill reflow couple` command to finish them")
        emb = load_file(str(self.dir / self.manifest["embeddings"]))
        self.prompt_embeds = emb["prompt_embeds"]
        self.pooled = emb.get("pooled")
        self.time_ids = None if self.manifest.get("time_ids") is None else torch.tensor(self.manifest["time_ids"])
        self.sigma_boundaries = torch.tensor(self.manifest["sigma_boundaries"], dtype=torch.float64)
        self.num_windows = int(self.manifest["num_windows"])
        small = {}
        counts = []
        for s in self.manifest["shards"]:
            with safe_open(str(self.dir / s), framework="pt") as f:
                for k in ("prompt_index", "seed", "index"):
                    small.setdefault(k, []).append(f.get_tensor(k))
                counts.append(int(f.metadata()["count"]))
        self.prompt_index = torch.cat(small["prompt_index"])
        self.seed = torch.cat(small["seed"])
        self.offsets = np.cumsum([0] + counts)
        per = int(np.prod(self.manifest["latent_shape"])) * (self.num_windows + 1) * 4
        self.in_memory = per * len(self) <= max_in_memory_bytes
        self._handles = {}
        self._states = None
        if self.in_memory:
            self._states = torch.cat([load_file(str(self.dir / s))["boundary_states"].float()
                                      for s in self.manifest["shards"]])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def uncond_index(self) -> int:
        return len(self.prompt_embeds) - 1

    def _handle(self, j: int):
        if j not in self._handles:
            self._handles[j] = safe_open(str(self.dir / self.manifest["shards"][j]), framework="pt")
        return self._handles[j]

    def boundary_states(self, idx: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, K+1, C, H, W)`` (``which is None``) or ``(B, C, H, W)``: boundary ``which[b]`` of coupling
        ``idx[b]`` (float32)."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if self._states is not None:
            rows = self._states[idx]
        else:
            out = []
            for i in idx.tolist():
                j = int(np.searchsorted(self.offsets, i, side="right") - 1)
                local = i - int(self.offsets[j])
                out.append(self._handle(j).get_slice("boundary_states")[local:local + 1].float())
            rows = torch.cat(out)
        if which is None:
            return rows
        which = torch.as_tensor(which, dtype=torch.long).reshape(-1)
        return rows[torch.arange(len(idx)), which]

    def tensor(self, name: str) -> torch.Tensor:
        """A whole per-coupling tensor (``noise``, ``data``, ...) concatenated over shards (for tests/diagnostics)."""
        return torch.cat([load_file(str(self.dir / s))[name] for s in self.manifest["shards"]])

    @property
    def flow_family(self) -> str | None:
        """``"sd3"`` / ``"flux"`` for flow-matching teachers (manifests from before FLUX support: SD3), else None."""
        if self.manifest["teacher"] != "flow":
            return None
        return self.manifest.get("flow_family") or "sd3"

    def conditioning(self, idx: torch.Tensor) -> dict:
        """Model keyword arguments for couplings ``idx`` (CPU tensors): ``encoder_hidden_states``, plus SDXL's
        ``added_cond_kwargs`` or SD3/FLUX's ``pooled_projections``, plus FLUX-dev's embedded ``guidance`` (the
        couplings' guidance scale) for models with ``guidance_embeds``."""
        rows = self.prompt_index[torch.as_tensor(idx, dtype=torch.long)]
        cond = {"encoder_hidden_states": self.prompt_embeds[rows]}
        if self.pooled is not None and self.time_ids is not None:
            cond["added_cond_kwargs"] = {"text_embeds": self.pooled[rows],
                                         "time_ids": self.time_ids.reshape(1, -1).expand(len(rows), -1).clone()}
        elif self.pooled is not None:
            cond["pooled_projections"] = self.pooled[rows]
        if self.manifest.get("guidance_embeds"):
            cond["guidance"] = torch.full((len(rows),), float(self.manifest["guidance_scale"]))
        return cond


def load_couplings(out_dir: str | Path, **kw) -> CouplingSet:
    return CouplingSet(out_dir, **kw)
