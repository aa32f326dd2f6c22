"""Quality vs. steps for a base model and any number of LoRA/sampler "methods" (``stepdistill eval``).

Every method samples the same prompts with the same per-image seeds (:func:`stepdistill.sampling.generate`:
image ``i`` starts from ``torch.Generator().manual_seed(seed + i)``), at its own step counts, and each
(method, steps) cell reports:

* ``prompt_accuracy`` (+ ``acc_<attribute>``) and ``toy_fid`` -- only when every prompt is a toy-world
  prompt (:func:`stepdistill.toy.scenes.parse_caption` reads it);
* ``fid`` (Inception) with ``--inception-weights FILE`` and ``clip_score`` with ``--clip-model DIR``; without
  them (or without their package) the value is ``null`` and ``unavailable[<metric>]`` says why;
* ``sec_per_image``: wall time per image of the pipeline call (the only number that is not reproducible).

Seeds: image ``i`` starts from ``seed + i`` and, for samplers that inject noise between steps (LCM at 2+ steps,
TCD with ``eta > 0``), draws that noise from its own generator (:func:`seeded_generate`), so every number but
the timing repeats exactly.

Method specs: :mod:`stepdistill.eval.specs`.

Outputs (in ``--out``): ``results.json``, ``results.md``, ``quality_vs_steps.png``, ``grid-<method>.png``.
"""
from __future__ import annotations

import json
import platform
import re
import warnings
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image

from ..data.prompts import read_prompts
from ..data.sources import IMAGE_SUFFIXES
from ..models.latents import native_resolution
from ..models.pipeline import load_pipeline
from ..sampling import (
    STEP_NOISE_SEED_OFFSET,
    apply_sampler,
    generate,
    image_grid,
    load_loras_into_pipeline,
)
from ..toy.scenes import parse_caption, reference_scenes
from ..toy.world import TOY_GUIDANCE
from . import metrics
from .report import plot_quality_vs_steps, results_markdown
from .specs import (
    STUDENT_STEPS,
    TEACHER_STEPS,
    MethodSpec,
    baseline_for,
    SpecError,
    parse_method,
    resolve_method,
)


def are_toy_prompts(prompts: list[str]) -> bool:
    try:
        for p in prompts:
            parse_caption(p)
    except ValueError:
        return False
    return True


def toy_reference_images(prompts: list[str], seed: int = metrics.REFERENCE_SEED) -> np.ndarray:
    """One rendered scene per prompt (open attributes drawn freely): the reference set of Inception FID on toy prompts."""
    return reference_scenes(prompts, 1, seed=seed)


def load_reference_images(directory: str | Path, size: tuple[int, int]) -> np.ndarray:
    files = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise metrics.MetricUnavailable(f"reference image folder {directory} holds fewer than 2 images")
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize(size[::-1], Image.BICUBIC)) for f in files])


def seeded_generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int = 0, batch_size: int = 64,
                    **pipe_kwargs):
    """:func:`stepdistill.sampling.generate`, which seeds both the initial noise (image ``i``: ``seed + i``) and
    the noise stochastic samplers (LCM multi-step, TCD with ``eta > 0``) inject between steps
    (``STEP_NOISE_SEED_OFFSET + seed + i``), so a rerun gives the same images."""
    return generate(pipe, prompts, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, **pipe_kwargs)


def cell_metrics(images: np.ndarray, prompts: list[str], toy: bool, inception_weights=None, clip_model=None,
                 reference_images: np.ndarray | None = None, reference_reason: str | None = None) -> dict:
    cell: dict = {"unavailable": {}}
    if toy:
        cell.update(metrics.toy_metrics(images, prompts))
        if cell["toy_fid"] is None:
            cell["unavailable"]["toy_fid"] = "toy-FID needs at least 2 images"
    else:
        cell["prompt_accuracy"] = cell["toy_fid"] = None
        reason = "only defined on toy-world prompts"
        cell["unavailable"].update(prompt_accuracy=reason, toy_fid=reason)
    try:
        if reference_images is None and inception_weights is not None:
            raise metrics.MetricUnavailable(reference_reason or "no reference images")
        cell["fid"] = metrics.inception_fid(images, reference_images, inception_weights)
    except metrics.MetricUnavailable as e:
        cell["fid"] = None
        cell["unavailable"]["fid"] = str(e)
    try:
        cell["clip_score"] = metrics.clip_score(images, prompts, clip_model)
    except metrics.MetricUnavailable as e:
        cell["clip_score"] = None
        cell["unavailable"]["clip_score"] = str(e)
    return cell


def environment(device=None) -> dict:
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    return {"device": name, "device_type": dev.type, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


def evaluate(out_dir: str | Path, methods: list[str | MethodSpec] = ("teacher",), model: str = "toy",
             prompts: str | list[str] = "toy:200", seed: int = 0, prompt_seed: int = 0,
             student_steps=STUDENT_STEPS, teacher_steps=TEACHER_STEPS, teacher_guidance: float | None = None,
             inception_weights: str | None = None, clip_model: str | None = None,
             reference_images: str | None = None, grid_prompts: int = 8, batch_size: int = 64,
             device: str | None = None, dtype: torch.dtype | None = None, verbose: bool = True,
             baselines: bool = True) -> dict:
    """Evaluate each method at each of its step counts; write ``results.json``, ``results.md``,
    ``quality_vs_steps.png`` and ``grid-<method>.png`` into ``out_dir``; return the results dict. With
    ``baselines`` (the default), each student is followed by ``<student>-base``: the base model with no adapter
    under the student's sampler, steps and guidance."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(prompts, str):
        prompt_list, prompt_source = read_prompts(prompts, seed=prompt_seed)
    else:
        prompt_list, prompt_source = list(prompts), f"{len(prompts)} prompts given in code"
    toy = are_toy_prompts(prompt_list)
    if teacher_guidance is None:
        teacher_guidance = TOY_GUIDANCE if toy else 7.5
    specs = [m if isinstance(m, MethodSpec) else parse_method(m) for m in methods]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SpecError(f"method names must be distinct, got {names}; name them with NAME=...")
    resolved = [resolve_method(s, teacher_steps, student_steps, teacher_guidance) for s in specs]
    if baselines:  # each student is followed by the base model under its own sampler and guidance
        taken = set(names)
        with_base = []
        for spec, res in zip(specs, resolved):
            with_base.append((spec, res))
            if spec.loras and baseline_for(res)["name"] not in taken:
                base = baseline_for(res)
                with_base.append((MethodSpec(base["name"]), base))
        specs, resolved = [s for s, _ in with_base], [r for _, r in with_base]

    ref_images, ref_reason, ref_source = None, None, None
    if inception_weights is not None:
        if reference_images is not None:
            ref_source = str(reference_images)
        elif toy:
            ref_source = f"rendered toy scenes for the same prompts (seed {metrics.REFERENCE_SEED})"
        else:
            ref_reason = "Inception FID needs reference images: pass --reference-images DIR"

    results = {"model": model, "prompts": {"source": prompt_source, "count": len(prompt_list), "toy": toy},
               "seed": seed, "seeding": f"image i: initial noise seed + i, sampler noise {STEP_NOISE_SEED_OFFSET} + seed + i",
               "environment": None, "fid_reference": ref_source, "methods": {}}
    grids = {}
    for spec, res in zip(specs, resolved):
        pipe = load_pipeline(model, device=device, dtype=dtype)
        if results["environment"] is None:
            results["environment"] = environment(pipe.device)
        if spec.loras:
            load_loras_into_pipeline(pipe, spec.loras)
        if inception_weights is not None and ref_images is None and ref_reason is None:
            if reference_images is not None:
                size = (native_resolution(pipe),) * 2
                try:
                    ref_images = load_reference_images(reference_images, size)
                except metrics.MetricUnavailable as e:
                    ref_reason = str(e)
            else:
                ref_images = toy_reference_images(prompt_list)
        cells, rows = {}, []
        for steps in res["steps"]:
            apply_sampler(pipe, res["sampler"], steps, res["num_windows"])
            kwargs = {"eta": res["eta"]} if res["eta"] is not None else {}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                images, sec = seeded_generate(pipe, prompt_list, steps=steps, guidance=res["guidance"], seed=seed,
                                              batch_size=batch_size, **kwargs)
            cell = cell_metrics(images, prompt_list, toy, inception_weights, clip_model, ref_images, ref_reason)
            cell["sec_per_image"] = sec
            notes = sorted({str(w.message) for w in caught if "reflow windows" in str(w.message)})
            if notes:
                cell["notes"] = notes
            cells[str(steps)] = cell
            rows.append(images[:grid_prompts])
            if verbose:
                acc, fid = cell.get("prompt_accuracy"), cell.get("toy_fid")
                print(f"{spec.name:>12s} {res['sampler']:>7s} {steps:3d} steps: "
                      + (f"prompt_acc {acc:.3f} " if acc is not None else "")
                      + (f"toy_fid {fid:.2f} precision {cell['precision']:.2f} recall {cell['recall']:.2f} "
                         if fid is not None else "")
                      + f"{sec:.4f} s/img", flush=True)
        results["methods"][spec.name] = {**res, "cells": cells}
        grid = image_grid(rows, row_labels=[f"{s} steps" for s in res["steps"]],
                          col_labels=list(prompt_list[:grid_prompts]), scale=3)
        grid_path = out / f"grid-{_file_safe(spec.name)}.png"
        grid.save(grid_path)
        grids[spec.name] = grid_path.name
        del pipe
    results["grids"] = grids
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_markdown(results))
    plot_quality_vs_steps(results, out / "quality_vs_steps.png")
    if verbose:
        print(f"wrote {out / 'results.json'}, results.md, quality_vs_steps.png, " + ", ".join(grids.values()))
    return results


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
