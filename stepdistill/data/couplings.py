"""Coupling sets on disk: writing shards and manifests, and reading a finished set for training.

A coupling is a (noise, data) pair of a teacher's ODE plus its window-boundary states (produced by
:mod:`stepdistill.methods.reflow_couplings`). Conventions: diffusers' flow convention (``s = 1`` noise,
``z = (1 - s) x0 + s eps``, ``v = eps - x0``).

Storage (``out_dir``)
---------------------
* ``manifest.json``: the arguments (checked on every rerun), the prompts table, the window boundaries and the
  full step grid, the shard list, the conventions in words. It is written once (identical from every worker)
  and never rewritten: a shard is done when its file exists with the run's fingerprint and its row count in its
  header (the file is written atomically, so it is its own done marker). Several workers may therefore fill one
  directory at once, each taking the shards ``j`` with ``j % num_shards == shard_index``.
* no separate embeddings file (version 1 had ``embeddings.safetensors``, every distinct prompt's embedding, read
  whole by every rank): each shard carries the embeddings of its own distinct prompts (below).
* ``couplings-NNNNN.safetensors`` (``shard_size`` couplings each), per coupling ``i``:

  - ``noise`` ``(C, H, W)``: the Gaussian draw ``torch.randn(generator=torch.Generator().manual_seed(seed + i))``
    (the ``latents`` a diffusers pipeline would start from -- for ``FluxPipeline`` after
    :func:`pack_flux_latents`; also :func:`stepdistill.sampling.generate`'s noise for image ``i``);
  - ``later_states`` ``(K, C, H, W)``: the flow states ``z`` at ``sigma_boundaries[1..K]``; the last one is the
    data, the ODE's endpoint at ``s = 0`` (a clean latent as the UNet/VAE sees it, scaled by the VAE's
    ``scaling_factor``). The state at ``sigma_boundaries[0]`` is not stored: it is the start state computed from
    ``noise`` (``n(sigma_max) * noise`` for VP, ``noise`` for flow teachers). Readers get all ``K + 1`` as
    ``boundary_states`` and the endpoint as ``data`` (:meth:`CouplingSet.tensor`). Version 1 sets (which stored
    ``data`` and all ``K + 1`` states) are read too.
  - ``prompt_row`` (row of this shard's ``emb_*`` tables), ``prompt_index`` (the prompt's row in the manifest's
    prompts table), ``seed`` (``seed + i``), ``guidance``, ``index`` (``i``);
  - per shard: ``emb_prompt_embeds`` (one row per distinct prompt of the shard, first-appearance order, then the
    unconditional embedding: the empty prompt, or zeros where the pipeline uses zeros: SDXL's
    ``force_zeros_for_empty_prompt``) and ``emb_pooled`` for SDXL/SD3/FLUX, in the storage dtype. Computed with
    ``pipe.encode_prompt`` (the pipeline's default ``max_sequence_length``) when the shard is generated, so
    training never runs a text encoder; a worker encodes only its shards' prompts, and training holds the
    embeddings in RAM only when the whole set fits (``max_in_memory_bytes``), else reads them per batch.

Every file is written to a temporary name and renamed into place. A run interrupted at any point resumes
with the same arguments, skipping finished shards; a manifest holding different arguments raises
:class:`CouplingArgumentsMismatch`. Training reads one directory or several (a list, comma-separated, or glob
patterns: :func:`load_couplings`) made by the same teacher and settings.
"""
from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..atomic import atomic_save_file, atomic_write_json
from ..errors import CouplingArgumentsMismatch, CouplingError
from ..parametrization import vp_state_to_flow

COUPLINGS_VERSION = 2  # 2: endpoints not stored twice (``later_states``)
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.safetensors"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CONVENTIONS = {
    "flow": "s=1 noise, s=0 data; z_s = (1-s) x0 + s eps; v = dz/ds = eps - x0",
    "noise": "torch.randn((1, C, H, W), generator=torch.Generator().manual_seed(seed + i)): the "
             "pipeline's initial latent (VP: x_T at the last training timestep; flow: z at s=1; FLUX: "
             "unpacked, FluxPipeline packs it into 2x2 patch tokens)",
    "later_states": "flow states z at sigma_boundaries[1:] (descending); the last = data, the ODE endpoint at "
                    "s=0 in model latent space (VAE-scaled); the state at sigma_boundaries[0] is the start state "
                    "(VP: sqrt((1-s_max)^2+s_max^2) * noise, flow: noise)",
    "prompt_row": "row of the shard's emb_prompt_embeds / emb_pooled; their last row is the unconditional one",
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


def plan_shards(out_dir: Path, names: list[str], n_total: int, shard_size: int, fingerprint: str,
                shard_index: int = 0, num_shards: int = 1) -> tuple[list[int], list[str]]:
    """``(todo, skipped)``: this worker's shard numbers (``j % num_shards == shard_index``) still to generate and
    its names already complete (recognised by their headers: :func:`shard_is_complete`)."""
    todo, skipped = [], []
    for j, name in enumerate(names):
        if j % num_shards != shard_index:
            continue
        n = min(shard_size, n_total - j * shard_size)
        if shard_is_complete(out_dir / name, fingerprint, n):
            skipped.append(name)
        else:
            todo.append(j)
    return todo, skipped


def write_shard(out_dir: Path, name: str, tensors: dict, fingerprint: str, first_index: int):
    """Write one shard atomically; its header (fingerprint, count) marks it done."""
    n = len(tensors["index"])
    atomic_save_file(tensors, out_dir / name, metadata={"fingerprint": fingerprint, "count": str(n),
                                                        "first_index": str(first_index)})


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
        m = self.manifest
        expected = [min(m["shard_size"], m["num_couplings"] - j * m["shard_size"]) for j in range(len(m["shards"]))]
        missing = [s for s, n in zip(m["shards"], expected)
                   if not shard_is_complete(self.dir / s, m["fingerprint"], n)]
        if missing:
            raise CouplingError(f"couplings at {self.dir} are incomplete ({len(missing)} of "
                                f"{len(self.manifest['shards'])} shards missing, e.g. {missing[0]}); re-run the same "
                                "`stepdistill reflow couple` command (every --shard-index) to finish them")
        self.version = int(m.get("version", 1))
        self.time_ids = None if m.get("time_ids") is None else torch.tensor(m["time_ids"])
        self.sigma_boundaries = torch.tensor(m["sigma_boundaries"], dtype=torch.float64)
        self.num_windows = int(m["num_windows"])
        small, counts, emb_counts, emb_bytes = {}, [], [], 0
        keys = ("prompt_index", "seed", "index") + (("prompt_row",) if self.version >= 2 else ())
        for s in m["shards"]:
            with safe_open(str(self.dir / s), framework="pt") as f:
                for k in keys:
                    small.setdefault(k, []).append(f.get_tensor(k))
                counts.append(int(f.metadata()["count"]))
                if self.version >= 2:
                    shape = f.get_slice("emb_prompt_embeds").get_shape()
                    emb_counts.append(int(shape[0]))
                    emb_bytes += int(np.prod(shape)) * 4
        self.prompt_index = torch.cat(small["prompt_index"])
        self.seed = torch.cat(small["seed"])
        self.offsets = np.cumsum([0] + counts)
        per = int(np.prod(m["latent_shape"])) * (self.num_windows + 1) * 4  # float32 in RAM
        self.in_memory = per * len(self) + emb_bytes <= max_in_memory_bytes
        self._handles = {}
        self._states = None
        if self.version >= 2:  # embeddings per shard: a coupling's row in the shards' tables, concatenated
            self.emb_offsets = np.cumsum([0] + emb_counts)
            self.cond_row = torch.cat([r + int(o) for r, o in zip(small["prompt_row"], self.emb_offsets)])
            self.prompt_embeds = self.pooled = None
            if self.in_memory:
                self.prompt_embeds = self._emb_table("emb_prompt_embeds")
                self.pooled = self._emb_table("emb_pooled")
        else:  # version 1: one table of every distinct prompt (embeddings.safetensors)
            emb = load_file(str(self.dir / m["embeddings"]))
            self.prompt_embeds, self.pooled, self.cond_row = emb["prompt_embeds"], emb.get("pooled"), self.prompt_index
        self.has_pooled = self.pooled is not None or (self.version >= 2 and self._shard_has("emb_pooled"))
        if self.in_memory:
            self._states = torch.cat([self._full_states(load_file(str(self.dir / s)))
                                      for s in self.manifest["shards"]])

    def _shard_has(self, name: str) -> bool:
        return name in self._handle(0).keys()  # noqa: SIM118 -- safe_open has no __contains__

    def _emb_table(self, name: str) -> torch.Tensor | None:
        if not self._shard_has(name):
            return None
        return torch.cat([self._handle(j).get_tensor(name).float() for j in range(len(self.manifest["shards"]))])

    def _emb_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Embedding rows (float32) read from the shards (sets too large to hold in RAM)."""
        out = []
        for r in rows.tolist():
            j = int(np.searchsorted(self.emb_offsets, r, side="right") - 1)
            local = r - int(self.emb_offsets[j])
            out.append(self._handle(j).get_slice(name)[local:local + 1].float())
        return torch.cat(out)

    def _full_states(self, f, rows: slice = slice(None)) -> torch.Tensor:
        """All ``K + 1`` boundary states (float32) of ``rows`` of one shard (``f``: a dict or a safe_open handle)."""
        def get(name):
            return f[name][rows] if isinstance(f, dict) else f.get_slice(name)[rows]

        if int(self.manifest.get("version", 1)) < 2:
            return get("boundary_states").float()
        noise = get("noise").float()
        start = vp_state_to_flow(noise, float(self.manifest["sigma_max"])) if self.manifest["teacher"] == "vp" else noise
        return torch.cat([start[:, None], get("later_states").float()], dim=1)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        """Row ``i`` as a map-style dataset item: ``states`` ``(K+1, C, H, W)`` (float32) and ``cond`` (the model
        keyword arguments of :meth:`conditioning`, unbatched)."""
        idx = torch.tensor([int(i)])
        cond = {k: ({kk: vv[0] for kk, vv in v.items()} if isinstance(v, dict) else v[0])
                for k, v in self.conditioning(idx).items()}
        return {"states": self.boundary_states(idx)[0], "cond": cond}

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
                out.append(self._full_states(self._handle(j), slice(local, local + 1)))
            rows = torch.cat(out)
        if which is None:
            return rows
        which = torch.as_tensor(which, dtype=torch.long).reshape(-1)
        return rows[torch.arange(len(idx)), which]

    def tensor(self, name: str) -> torch.Tensor:
        """A whole per-coupling tensor (``noise``, ``data``, ``boundary_states``, ...) concatenated over shards (for
        tests/diagnostics); ``data`` and ``boundary_states`` in float32 for version 2 sets."""
        parts = []
        for s in self.manifest["shards"]:
            f = load_file(str(self.dir / s))
            if name in ("data", "boundary_states") and name not in f:
                states = self._full_states(f)
                parts.append(states[:, -1] if name == "data" else states)
            else:
                parts.append(f[name])
        return torch.cat(parts)

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
        rows = self.cond_row[torch.as_tensor(idx, dtype=torch.long).reshape(-1)]

        def table(held, name):
            return held[rows].float() if held is not None else self._emb_rows(name, rows)

        cond = {"encoder_hidden_states": table(self.prompt_embeds, "emb_prompt_embeds")}
        pooled = table(self.pooled, "emb_pooled") if self.has_pooled else None
        if pooled is not None and self.time_ids is not None:
            cond["added_cond_kwargs"] = {"text_embeds": pooled,
                                         "time_ids": self.time_ids.reshape(1, -1).expand(len(rows), -1).clone()}
        elif pooled is not None:
            cond["pooled_projections"] = pooled
        if self.manifest.get("guidance_embeds"):
            cond["guidance"] = torch.full((len(rows),), float(self.manifest["guidance_scale"]))
        return cond


# the settings every directory of one training set must share (the objective checks them against the model)
SHARED_KEYS = ("teacher", "prediction_type", "flow_family", "guidance_embeds", "guidance_scale", "sigma_max",
               "sigma_boundaries", "num_windows", "latent_shape", "time_ids")


def coupling_dirs(spec) -> list[Path]:
    """The directories named by ``spec``: a path, a list of paths, or comma-separated paths; each may be a glob
    pattern (``couplings/part-*``), expanded in sorted order."""
    parts = [str(p) for p in spec] if isinstance(spec, (list, tuple)) else str(spec).split(",")
    dirs: list[Path] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if glob.has_magic(part):
            found = sorted(Path(p) for p in glob.glob(part) if Path(p).is_dir())
            if not found:
                raise CouplingError(f"couplings_dir pattern {part!r} matches no directory; check the path, or "
                                    "generate couplings there with `stepdistill reflow couple --out DIR`")
            dirs += found
        else:
            dirs.append(Path(part))
    if not dirs:
        raise CouplingError("couplings_dir names no directory; set couplings_dir=DIR (or DIR1,DIR2 or a glob)")
    return list(dict.fromkeys(dirs))


class CouplingSets:
    """Several finished coupling directories of one teacher and setting, read as one set (rows in order)."""

    def __init__(self, sets: list[CouplingSet]):
        first = sets[0]
        for other in sets[1:]:
            diff = [k for k in SHARED_KEYS if first.manifest.get(k) != other.manifest.get(k)]
            if diff:
                k = diff[0]
                raise CouplingError(f"couplings at {first.dir} and {other.dir} differ in {', '.join(diff)} "
                                    f"({first.manifest.get(k)!r} vs {other.manifest.get(k)!r}); train on couplings "
                                    "made by one teacher with the same settings")
        self.sets, self.dir = sets, first.dir
        self.manifest = {**first.manifest, "num_couplings": sum(len(c) for c in sets),
                         "model": first.manifest.get("model", ""), "directories": [str(c.dir) for c in sets]}
        self.sigma_boundaries, self.num_windows = first.sigma_boundaries, first.num_windows
        self.flow_family = first.flow_family
        self.offsets = np.cumsum([0] + [len(c) for c in sets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        j = int(np.searchsorted(self.offsets, int(i), side="right") - 1)
        return self.sets[j][int(i) - int(self.offsets[j])]

    def tensor(self, name: str) -> torch.Tensor:
        return torch.cat([c.tensor(name) for c in self.sets])


def load_couplings(spec, **kw) -> CouplingSet | CouplingSets:
    """One couplings directory, or several (a list, comma-separated paths or glob patterns: :func:`coupling_dirs`)
    read as one set."""
    sets = [CouplingSet(d, **kw) for d in coupling_dirs(spec)]
    return sets[0] if len(sets) == 1 else CouplingSets(sets)
