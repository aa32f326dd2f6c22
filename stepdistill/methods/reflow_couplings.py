"""Teacher couplings for reflow: solve the teacher's guided probability-flow ODE from seeded noise and store
(noise, data, window-boundary states) as a coupling set (:mod:`stepdistill.data.couplings`).

The K windows are ``reflow.window_boundaries(K, sigma_max)`` (equal to the student scheduler's
``PiecewiseRectifiedFlowScheduler.window_sigmas``); the ODE is integrated on a grid that contains every window
boundary as a step point (:func:`stepdistill.ode.coupling_grid`), so the recorded boundary states are the
solver's own states at exactly those flow times. The velocity field is :class:`stepdistill.models.denoiser.
TeacherFlow` (VP UNets and SD3 / FLUX transformers), the solvers are :mod:`stepdistill.ode`.

Coupling ``i`` starts from ``torch.Generator().manual_seed(seed + i)`` (:func:`stepdistill.models.latents.
seeded_noise`, also :func:`stepdistill.sampling.generate`'s noise for image ``i``) and does not depend on
``batch_size``. Every file is written atomically; a run interrupted at any point resumes with the same
arguments, and different arguments raise :class:`stepdistill.errors.CouplingArgumentsMismatch`. The work splits
across workers (``shard_index`` of ``num_shards``: processes, GPUs or machines sharing the directory): each
generates the file shards ``j % num_shards == shard_index``; the result is the same set one worker would make.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import reflow
from ..data.couplings import (
    CONVENTIONS,
    COUPLINGS_VERSION,
    STORAGE_DTYPES,
    check_args,
    plan_shards,
    prompts_sha256,
    prompts_table,
    read_manifest,
    shard_names,
    write_manifest,
    write_shard,
)
from ..errors import CouplingError
from ..models.denoiser import TeacherFlow
from ..models.family import family_of
from ..models.latents import seeded_noise
from ..ode import SOLVERS, coupling_grid, solve_flow_ode
from ..toy.world import TOY_GUIDANCE


class CouplingInterrupted(RuntimeError):
    """Raised by the ``stop_after_shards`` test hook to simulate a crash."""


def cond_rows(emb: dict, rows: torch.Tensor, device, dtype, time_ids) -> dict:
    out = {"prompt_embeds": emb["prompt_embeds"][rows].to(device, dtype)}
    if "pooled" in emb:
        out["pooled"] = emb["pooled"][rows].to(device, dtype)
    if time_ids is not None:
        out["time_ids"] = time_ids.reshape(1, -1).expand(len(rows), -1).to(device, dtype)
    return out


@torch.no_grad()
def solve_teacher_ode(teacher: TeacherFlow, noise: torch.Tensor, grid: torch.Tensor, solver: str, cond: dict,
                      uncond: dict | None, guidance: float, record: list[int] | None = None):
    """Integrate the teacher's guided ODE from ``noise`` (the pipeline's initial latent) along ``grid``: returns
    ``(z_data, states)`` as :func:`stepdistill.ode.solve_flow_ode`, float32 on the model's device."""
    z = teacher.start_state(noise.to(teacher.device))
    return solve_flow_ode(lambda x, s: teacher.velocity(x, s, cond, uncond, guidance), z, grid, solver, record,
                          vp=teacher.kind == "vp")


def solve_batch(teacher: TeacherFlow, emb: dict, prompt_rows: torch.Tensor, ids: list[int], seed: int, grid, solver: str,
                guidance: float, record: list[int] | None = None):
    """Couplings ``ids`` from their seeded noise (``seed + i``), conditioned on the embedding rows ``prompt_rows``
    (the last row of ``emb`` is the unconditional one): ``(noise, z_data, states, seconds)``, the time spent in the
    solve alone (synchronised on CUDA)."""
    device, dtype, time_ids = teacher.device, teacher.dtype, teacher.time_ids(teacher.shape)
    noise = seeded_noise(ids, seed, teacher.shape)
    cond = cond_rows(emb, prompt_rows, device, dtype, time_ids)
    uncond_rows = torch.full((len(ids),), len(emb["prompt_embeds"]) - 1)
    uncond = None if guidance == 1.0 or not teacher.uses_cfg else cond_rows(emb, uncond_rows, device, dtype, time_ids)
    t0 = time.perf_counter()
    z_data, states = solve_teacher_ode(teacher, noise, grid, solver, cond, uncond, guidance, record)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return noise, z_data, states, time.perf_counter() - t0


@dataclass
class CouplingRunResult:
    out_dir: Path
    num_couplings: int
    num_generated: int            # couplings computed by this call (the rest were already on disk)
    shards_written: list[str]
    shards_skipped: list[str]
    seconds: float                # wall time spent generating (excludes skipped shards)
    couplings_per_second: float   # num_generated / seconds (0 when nothing was generated)
    manifest: dict = field(repr=False, default_factory=dict)


@torch.no_grad()
def generate_couplings(pipe, prompts: list[str], out_dir: str | Path, *, num_steps: int = 25, solver: str = "ddim",
                       guidance_scale: float = 5.0, num_windows: int = 1, seed: int = 0, shard_size: int = 256,
                       batch_size: int = 64, spacing: str = "sigma", height: int | None = None,
                       width: int | None = None, storage_dtype: str = "float32", model_id: str = "",
                       progress: bool = True, stop_after_shards: int | None = None, shard_index: int = 0,
                       num_shards: int = 1) -> CouplingRunResult:
    """Generate (or finish) one coupling per prompt into ``out_dir``; see the module docstring for the format.

    Coupling ``i`` starts from ``torch.Generator().manual_seed(seed + i)`` and does not depend on
    ``batch_size`` (up to float rounding of batched kernels). Re-running with the same arguments skips the
    shards already written; different arguments raise :class:`CouplingArgumentsMismatch`. ``batch_size`` and
    ``progress`` may change between runs. ``shard_index`` / ``num_shards``: this worker's part (module docstring);
    they are not arguments of the result either. ``stop_after_shards`` is a test hook: raise
    :class:`CouplingInterrupted` after writing that many shards in this call."""
    prompts = list(prompts)
    if not prompts:
        raise CouplingError("no prompts to generate couplings for")
    if storage_dtype not in STORAGE_DTYPES:
        raise CouplingError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise CouplingError("shard_size and batch_size must be >= 1")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise CouplingError(f"--shard-index must be in [0, --num-shards) and --num-shards >= 1, got "
                            f"{shard_index} of {num_shards}")
    out_dir = Path(out_dir)
    teacher = TeacherFlow(pipe, height, width)
    teacher.check_guidance(guidance_scale)
    shape = teacher.shape
    grid, bidx = coupling_grid(num_steps, num_windows, teacher.sigma_max, spacing, teacher.clock)
    if solver not in SOLVERS:
        raise CouplingError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    table, prompt_index = prompts_table(prompts)
    n_total = len(prompts)
    names = shard_names(n_total, shard_size)
    args = {"version": COUPLINGS_VERSION, "model": model_id, **teacher.describe(), "solver": solver,
            "num_steps": int(num_steps), "spacing": spacing, "guidance_scale": float(guidance_scale),
            "num_windows": int(num_windows), "seed": int(seed), "shard_size": int(shard_size),
            "num_couplings": n_total, "prompts_sha256": prompts_sha256(prompts), "latent_shape": list(shape),
            "storage_dtype": storage_dtype}
    fingerprint = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]

    manifest = read_manifest(out_dir)
    if manifest is not None:
        check_args(manifest, args, out_dir)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
    time_ids = teacher.time_ids(shape)
    if manifest is None:
        vae_cfg = getattr(getattr(pipe, "vae", None), "config", {}) or {}
        manifest = {
            "version": COUPLINGS_VERSION, "fingerprint": fingerprint, "args": args,
            "model": model_id, "pipeline": type(pipe).__name__, "teacher": teacher.kind,
            "prediction_type": teacher.prediction_type, "solver": solver, "num_steps": int(num_steps),
            "spacing": spacing, "guidance_scale": float(guidance_scale), "num_windows": int(num_windows),
            "seed": int(seed), "sigma_max": float(teacher.sigma_max),
            "sigma_boundaries": [float(grid[i]) for i in bidx], "step_sigmas": [float(x) for x in grid],
            "boundary_grid_indices": bidx, "latent_shape": list(shape), "storage_dtype": storage_dtype,
            "num_couplings": n_total, "shard_size": int(shard_size), "prompts": table,
            "embeddings": "per shard", "shards": names,
            "time_ids": None if time_ids is None else time_ids.tolist(),
            "flow_family": teacher.family, "guidance_embeds": teacher.guidance_embeds,
            "vae_scaling_factor": float(vae_cfg.get("scaling_factor", 1.0) or 1.0),
            "vae_shift_factor": float(vae_cfg.get("shift_factor", None) or 0.0),
            "conventions": CONVENTIONS,
        }
        write_manifest(out_dir, manifest)
    todo, skipped = plan_shards(out_dir, names, n_total, shard_size, fingerprint, shard_index, num_shards)

    store = STORAGE_DTYPES[storage_dtype]
    mine = sum(min(shard_size, n_total - j * shard_size) for j in range(shard_index, len(names), num_shards))
    bar = tqdm(total=mine, initial=mine - sum(min(shard_size, n_total - j * shard_size) for j in todo),
               unit="coupling", desc="teacher couplings", disable=not progress)
    written, generated, elapsed = [], 0, 0.0
    try:
        for j in todo:
            lo, hi = j * shard_size, min((j + 1) * shard_size, n_total)
            # this shard's distinct prompts, encoded now (never the whole table): its own embeddings
            local_table, local_row = prompts_table(prompts[lo:hi])
            emb = teacher.encode_table(local_table, batch_size)
            parts = {"noise": [], "later_states": []}
            for b0 in range(lo, hi, batch_size):
                ids = list(range(b0, min(b0 + batch_size, hi)))
                noise, _, states, sec = solve_batch(teacher, emb, local_row[b0 - lo:b0 - lo + len(ids)], ids,
                                                         seed, grid, solver, guidance_scale, bidx)
                elapsed += sec
                generated += len(ids)
                parts["noise"].append(noise)  # the start state and the endpoint are not stored twice: the data
                parts["later_states"].append(states[:, 1:].cpu())  # is the last state (z_data)
                bar.update(len(ids))
                bar.set_postfix(couplings_per_s=f"{generated / max(elapsed, 1e-9):.3g}")
            n = hi - lo
            tensors = {k: torch.cat(v).to(store) for k, v in parts.items()}
            tensors.update({f"emb_{k}": v.to(store).contiguous() for k, v in emb.items()})  # the last row: uncond
            tensors.update(prompt_row=local_row, prompt_index=prompt_index[lo:hi].clone(),
                           seed=torch.arange(seed + lo, seed + hi, dtype=torch.long),
                           guidance=torch.full((n,), float(guidance_scale), dtype=torch.float32),
                           index=torch.arange(lo, hi, dtype=torch.long))
            name = names[j]
            write_shard(out_dir, name, tensors, fingerprint, lo)
            written.append(name)
            if stop_after_shards is not None and len(written) >= stop_after_shards and len(written) < len(todo):
                raise CouplingInterrupted(f"stopped after {len(written)} shard(s) (test hook)")
    finally:
        bar.close()
    return CouplingRunResult(out_dir=out_dir, num_couplings=n_total, num_generated=generated,
                             shards_written=written, shards_skipped=skipped, seconds=elapsed,
                             couplings_per_second=generated / elapsed if elapsed > 0 else 0.0, manifest=manifest)


@torch.no_grad()
def coupling_solver_error(pipe, prompts: list[str], solvers=(("ddim", 10), ("ddim", 25), ("dpmpp", 10),
                                                             ("dpmpp", 25), ("euler", 25)),
                          reference=("ddim", 1000), *, guidance_scale: float = 5.0, num_windows: int = 1,
                          seed: int = 0, batch_size: int = 64, spacing: str = "sigma", height: int | None = None,
                          width: int | None = None) -> dict:
    """How far each ``(solver, steps[, spacing])`` lands from a many-step reference solve from the same noise.

    Returns ``{"reference": {...}, "results": [{"solver", "steps", "spacing", "nfe", "rmse", "rmse_max",
    "seconds", "seconds_per_coupling"}, ...]}``; ``rmse`` is the mean over prompts of the per-sample RMSE of
    ``z_data`` (:func:`stepdistill.reflow.coupling_error`), ``nfe`` the guided model evaluations per coupling
    (x2 forward passes with CFG). The reference is itself a discretization: a first-order reference (``ddim``)
    at N steps has an error ~1/N, so compare high-order solvers against a reference well below their own error
    (e.g. ``("dpmpp", 500)``)."""
    teacher = TeacherFlow(pipe, height, width)
    teacher.check_guidance(guidance_scale)
    prompts = list(prompts)
    table, rows_all = prompts_table(prompts)
    emb = teacher.encode_table(table, batch_size)

    def run(solver, steps, spc):
        grid, _ = coupling_grid(steps, num_windows, teacher.sigma_max, spc, teacher.clock)
        outs, t_total = [], 0.0
        for b0 in range(0, len(prompts), batch_size):
            ids = list(range(b0, min(b0 + batch_size, len(prompts))))
            _, z, _, sec = solve_batch(teacher, emb, rows_all[ids], ids, seed, grid, solver, guidance_scale)
            t_total += sec
            outs.append(z.float().cpu())
        return torch.cat(outs), t_total

    def parse(entry):
        solver, steps = entry[0], int(entry[1])
        return solver, steps, entry[2] if len(entry) > 2 else spacing

    r_solver, r_steps, r_spacing = parse(reference)
    ref, ref_t = run(r_solver, r_steps, r_spacing)
    results = []
    for entry in solvers:
        solver, steps, spc = parse(entry)
        z, sec = run(solver, steps, spc)
        err = reflow.coupling_error(z, ref)
        results.append({"solver": solver, "steps": steps, "spacing": spc, "nfe": steps,
                        "rmse": float(err.mean()), "rmse_max": float(err.max()), "seconds": sec,
                        "seconds_per_coupling": sec / len(prompts)})
    return {"reference": {"solver": r_solver, "steps": r_steps, "spacing": r_spacing, "seconds": ref_t,
                          "data_rms": float(ref.pow(2).mean().sqrt())},
            "num_prompts": len(prompts), "guidance_scale": guidance_scale, "num_windows": num_windows,
            "teacher": teacher.kind, "results": results}


def default_guidance(model: str, guidance: float | None, pipe=None) -> float:
    """The guidance baked into couplings when none is given: the toy teacher's ``TOY_GUIDANCE`` (2), FLUX's embedded 3.5 (1 for
    models without a guidance embedding: FLUX has no CFG here), else SD's 7.5."""
    if guidance is not None:
        return guidance
    if model == "toy":
        return TOY_GUIDANCE
    if pipe is not None and family_of(pipe).name == "flux":
        return 3.5 if getattr(pipe.transformer.config, "guidance_embeds", False) else 1.0
    return 7.5
