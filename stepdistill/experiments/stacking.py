"""Stacking an acceleration LoRA with a style LoRA, and moving it to another base of the same family.

``stack_sweep`` (``stepdistill stack-eval``) samples one fixed prompt set, same per-image seeds, in these
cells and reports prompt accuracy, toy-FID and style strength (:func:`stepdistill.experiments.style.style_strength`):

* ``base``: the base model, DDIM 50 steps, guidance ``TOY_GUIDANCE`` (style strength of the unstyled world);
* ``style w``: base + style LoRA at weight w, DDIM 50 steps with guidance (what the style LoRA is for);
* ``style w ddim4``: base + style LoRA, DDIM 4 steps with guidance (few steps without acceleration);
* ``base lcm4``, ``style 1 lcm4``: the base model, and the style LoRA alone, under LCMScheduler 4 steps, guidance 1
  (the accelerated sampler without the acceleration LoRA: the baselines of the cells below);
* ``accel a``: the acceleration LoRA alone, LCMScheduler 4 steps, guidance 1;
* ``accel a + style w``: both adapters (``set_adapters`` weights a, w), LCMScheduler 4 steps, guidance 1.

The recommended weights maximise ``min(style retention, accuracy retention)`` over the combined cells, both
relative to the reference ``style 1.0`` at 50 steps: style retention = S / S_ref, accuracy retention =
prompt accuracy / prompt accuracy_ref.

``transfer_eval`` (``stepdistill transfer-eval``) fine-tunes the base (full UNet, epsilon objective) on a
shifted subset of the world (e.g. only large shapes), then compares on the fine-tune: its own DDIM 50 and
DDIM 4 (guidance) and its LCM 4 without an adapter with the *unchanged* acceleration LoRA at 4 LCM steps.

Outputs: ``results.json``, ``results.md``, ``grid.png`` in the output directory.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import lora
from ..eval import metrics
from ..models.pipeline import load_component, load_pipeline
from ..sampling import generate, image_grid, load_lora_adapter, lora_file, set_scheduler
from ..toy.scenes import SIZES
from ..toy.world import TOY_GUIDANCE, TOY_TEACHER_DIR, evaluation_prompts
from .style import (
    denoising_finetune,
    encode_scene_pool,
    reference_strengths,
    sample_styled_scenes,
    style_prompts,
    style_strength,
)

TOY_WEIGHTS = TOY_TEACHER_DIR.parent
# Where committed toy adapters would live (the tests look here and skip when they are absent).
TOY_ACCEL_LORA = TOY_WEIGHTS / "lcm-lora" / "pytorch_lora_weights.safetensors"
TOY_STYLE_LORA = TOY_WEIGHTS / "style-hollow" / "pytorch_lora_weights.safetensors"

ACCEL_WEIGHTS = (0.5, 0.75, 1.0)
STYLE_WEIGHTS = (0.5, 0.75, 1.0, 1.25)


@dataclass
class Cell:
    label: str
    sampler: str                 # "ddim" or "lcm" (keys of sampling.SCHEDULERS)
    steps: int
    guidance: float
    weights: dict = field(default_factory=dict)  # adapter name -> weight (absent = 0)


def load_stack(pipe, adapters: dict[str, str | Path], verify: bool = True) -> dict[str, dict]:
    """Load each LoRA file as adapter ``name`` with stock ``load_lora_weights``; check every layer arrived."""
    info = {}
    for name, path in adapters.items():
        md, fmt = load_lora_adapter(pipe, path, name, verify)
        info[name] = {"file": str(lora_file(path)), "format": fmt,
                      "method": md.get("stepdistill.method", md.get("method", ""))}
    return info


def set_stack_weights(pipe, names: list[str], weights: dict[str, float]):
    """Activate all ``names`` with ``weights`` (missing = 0: the adapter contributes exactly nothing)."""
    pipe.set_adapters(list(names), adapter_weights=[float(weights.get(n, 0.0)) for n in names])


def evaluate_cell(pipe, names, prompts, cell: Cell, seed: int = 0, fid: bool = True, style: str = "hollow"):

    # every cell starts from the pipeline's own scheduler config (set_scheduler carries settings such as
    # DDIM's trailing spacing over from the previous scheduler otherwise)
    if not hasattr(pipe, "_stepdistill_original_scheduler"):
        pipe._stepdistill_original_scheduler = pipe.scheduler
    pipe.scheduler = pipe._stepdistill_original_scheduler
    if cell.sampler == "ddim":  # latents are not in [-1, 1]: no x0 clipping (SD's own scheduler configs agree)
        set_scheduler(pipe, "ddim", trailing=cell.steps < 25, clip_sample=False)
    else:
        set_scheduler(pipe, cell.sampler)
    if names:
        set_stack_weights(pipe, names, cell.weights)
    images, sec = generate(pipe, prompts, steps=cell.steps, guidance=cell.guidance, seed=seed)
    out = {"label": cell.label, "sampler": cell.sampler, "steps": cell.steps, "guidance": cell.guidance,
           "weights": dict(cell.weights), **metrics.prompt_accuracy(images, prompts),
           "style_strength": style_strength(images, style), "sec_per_image": sec}
    if fid:
        out["toy_fid"] = metrics.toy_fid(images, prompts)
    return out, images


def recommend(results: list[dict], reference_label: str) -> dict:
    """Best combined cell by ``min(style retention, accuracy retention)`` against the reference cell."""
    ref = next(r for r in results if r["label"] == reference_label)
    best = None
    for r in results:
        w = r["weights"]
        if not (w.get("accel", 0) > 0 and w.get("style", 0) > 0):
            continue
        s_ret = r["style_strength"] / ref["style_strength"] if ref["style_strength"] > 0 else 0.0
        a_ret = r["prompt_accuracy"] / ref["prompt_accuracy"] if ref["prompt_accuracy"] > 0 else 0.0
        r["style_retention"], r["accuracy_retention"] = s_ret, a_ret
        score = min(s_ret, a_ret)
        if best is None or score > best["score"]:
            best = {"label": r["label"], "accel_weight": w["accel"], "style_weight": w["style"], "score": score,
                    "style_retention": s_ret, "accuracy_retention": a_ret}
    return best or {}


def stack_sweep(base: str, style_lora: str, accel_lora: str, out_dir: str | Path, n_prompts: int = 96,
                accel_weights=ACCEL_WEIGHTS, style_weights=STYLE_WEIGHTS, steps: int = 4, ref_steps: int = 50,
                guidance: float | None = None, seed: int = 0, grid_prompts: int = 10, device: str = "cpu",
                vae_reference: bool = True, n_reference: int = 500) -> dict:
    guidance = TOY_GUIDANCE if guidance is None else guidance
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = style_prompts(n_prompts, seed=seed)  # one shape on a plain background: what the style measure reads
    pipe = load_pipeline(base, device=device)
    names = ["accel", "style"]
    adapters = load_stack(pipe, {"accel": accel_lora, "style": style_lora})

    style_name = lora.read_lora(style_lora)[1].get("stepdistill.style", "hollow")

    cells = [Cell("base", "ddim", ref_steps, guidance, {})]
    cells += [Cell(f"style {w:g}", "ddim", ref_steps, guidance, {"style": w}) for w in style_weights]
    cells += [Cell(f"style 1 ddim{steps}", "ddim", steps, guidance, {"style": 1.0})]
    # the accelerated sampler without the acceleration LoRA: the baselines every accel cell is read against
    cells += [Cell(f"base lcm{steps}", "lcm", steps, 1.0, {}),
              Cell(f"style 1 lcm{steps}", "lcm", steps, 1.0, {"style": 1.0})]
    cells += [Cell(f"accel {a:g}", "lcm", steps, 1.0, {"accel": a}) for a in accel_weights]
    cells += [Cell(f"accel {a:g} + style {w:g}", "lcm", steps, 1.0, {"accel": a, "style": w})
              for a in accel_weights for w in style_weights]
    results, rows = [], {}
    t0 = time.perf_counter()
    for cell in cells:
        r, images = evaluate_cell(pipe, names, prompts, cell, seed=seed, style=style_name)
        results.append(r)
        rows[cell.label] = images[:grid_prompts]
        print(f"{cell.label:24s} {cell.sampler}-{cell.steps:<3d} acc {r['prompt_accuracy']:.3f} "
              f"style {r['style_strength']:.3f} toy-FID {r['toy_fid']:.2f}", flush=True)
    best = recommend(results, f"style {1:g}")
    report = {
        "base": base, "style_lora": str(style_lora), "accel_lora": str(accel_lora), "adapters": adapters,
        "n_prompts": n_prompts, "seed": seed, "guidance": guidance, "steps": steps, "ref_steps": ref_steps,
        "style": style_name,
        "style_strength_real": reference_strengths(n=n_reference, vae=pipe.vae if vae_reference else None,
                                                   style=style_name),
        "cells": results, "recommended": best, "reference_cell": "style 1",
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(stack_markdown(report))
    show = ["base", "style 1", f"style 1 ddim{steps}", f"style 1 lcm{steps}"]
    show += [f"accel {a:g}" for a in accel_weights[-1:]]
    show += [c.label for c in cells if c.label.startswith("accel ") and "+" in c.label]
    grid = image_grid([rows[k] for k in show], row_labels=show,
                      col_labels=list(prompts[:grid_prompts]), scale=3)
    grid.save(out / "grid.png")
    return report


def stack_markdown(report: dict) -> str:
    ref = report["style_strength_real"]
    lines = [
        "# Stacking: acceleration LoRA + style LoRA (toy world)", "",
        f"Base `{report['base']}`, {report['n_prompts']} prompts (`style_prompts(n, seed={report['seed']})`), "
        f"same per-image seeds in every cell. Reference cells: DDIM {report['ref_steps']} steps, guidance "
        f"{report['guidance']}; accelerated cells: LCMScheduler {report['steps']} steps, guidance 1.", "",
        f"Style `{report['style']}`. Strength on real renders ({ref['n']} scenes): unstyled {ref['unstyled']:.3f}, "
        f"styled {ref['styled']:.3f}"
        + (f"; after the base's VAE encode/decode: unstyled {ref['unstyled_vae_roundtrip']:.3f}, styled "
           f"{ref['styled_vae_roundtrip']:.3f}" if "styled_vae_roundtrip" in ref else "") + ". Prompt accuracy of "
        f"the same renders: unstyled {ref['unstyled_prompt_accuracy']:.3f}, styled {ref['styled_prompt_accuracy']:.3f}"
        + (f" (after the VAE: {ref['unstyled_vae_roundtrip_prompt_accuracy']:.3f}, "
           f"{ref['styled_vae_roundtrip_prompt_accuracy']:.3f})" if "styled_vae_roundtrip" in ref else "") + ".", "",
        "| cell | sampler | steps | guidance | prompt acc | style strength | toy-FID |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["cells"]:
        lines.append(f"| {r['label']} | {r['sampler']} | {r['steps']} | {r['guidance']:g} | "
                     f"{r['prompt_accuracy']:.3f} | {r['style_strength']:.3f} | {r.get('toy_fid', float('nan')):.2f} |")
    b = report.get("recommended") or {}
    if b:
        lines += ["", f"Recommended: accel weight **{b['accel_weight']:g}**, style weight **{b['style_weight']:g}** "
                      f"(style retention {b['style_retention']:.2f}, accuracy retention {b['accuracy_retention']:.2f} "
                      f"vs. `{report['reference_cell']}` at {report['ref_steps']} steps; rule: maximise the smaller "
                      "of the two)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- transfer

SHIFTS = {
    "large": (lambda s: s.size == "large", "only large shapes"),
    "black-bg": (lambda s: s.background == "black", "only black backgrounds"),
    "all": (lambda s: True, "all scenes"),
}


@dataclass
class FinetuneRecipe:
    shift: str = "large"
    style: str = "none"          # render the fine-tune data in a style (e.g. "hollow": a stylised checkpoint)
    n_images: int = 3000
    data_seed: int = 9500
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-4
    caption_dropout: float = 0.1
    seed: int = 0


def finetune_base(base: str, out_dir: str | Path, recipe: FinetuneRecipe = FinetuneRecipe(), device: str = "cpu",
                  log_every: int = 50) -> Path:
    """Full-UNet fine-tune of ``base`` on a shifted subset (epsilon objective, text encoder and VAE frozen);
    saves a pipeline directory (same family, new weights) and returns it."""
    if recipe.shift not in SHIFTS:
        raise ValueError(f"unknown shift {recipe.shift!r}; one of {sorted(SHIFTS)}")
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed + 23)
    pipe = load_pipeline(base, device=device, dtype=torch.float32)
    # the whole world's scenes (any count, texture), shifted: the evaluation prompts are the world's too, so a
    # fine-tune on one-shape plain-background scenes alone would forget the rest (world v2: toy-FID 669 -> 2719)
    images, scenes = sample_styled_scenes(recipe.n_images, recipe.data_seed, style=recipe.style,
                                          where=SHIFTS[recipe.shift][0], only_styleable=False)
    pool = encode_scene_pool(pipe, images, scenes, device)
    unet = pipe.unet
    unet.requires_grad_(True)
    losses = denoising_finetune(pipe, pool, list(unet.parameters()), steps=recipe.steps,
                                batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
                                caption_dropout=recipe.caption_dropout, gen=gen, device=device,
                                log_every=log_every, label="fine-tune")
    unet.requires_grad_(False)
    out = Path(out_dir)
    pipe.save_pretrained(str(out), safe_serialization=True)
    (out / "stepdistill_finetune.json").write_text(json.dumps(
        {**asdict(recipe), "base": base,
         "description": SHIFTS[recipe.shift][1] + ("" if recipe.style == "none" else f", rendered {recipe.style}"),
         "train_seconds": round(time.perf_counter() - t0, 1), "final_loss": float(np.mean(losses[-50:]))}, indent=1))
    return out


def relative_weight_change(base: str, finetuned: str) -> float:
    """``||W_ft - W_base|| / ||W_base||`` over all UNet weights: how far the fine-tune moved."""
    a, b = load_component(base).state_dict(), load_component(finetuned).state_dict()
    num = sum((b[k].float() - v.float()).pow(2).sum() for k, v in a.items())
    den = sum(v.float().pow(2).sum() for v in a.values())
    return float(torch.sqrt(num / den))


def _size_share(images, size: str = "large") -> float:
    pred = metrics.classify(images)["size"]
    return float(np.mean(pred == list(SIZES).index(size)))


def transfer_eval(base: str, finetuned: str, accel_lora: str, out_dir: str | Path, n_prompts: int = 96,
                  steps: int = 4, ref_steps: int = 50, guidance: float | None = None, seed: int = 0,
                  grid_prompts: int = 10, device: str = "cpu") -> dict:
    """4-step quality of fine-tune + unchanged acceleration LoRA vs. the fine-tune's own DDIM 4 and DDIM 50, and
    vs. the fine-tune with no adapter under the same sampler (LCM 4, guidance 1)."""
    guidance = TOY_GUIDANCE if guidance is None else guidance
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = evaluation_prompts(n_prompts, seed=seed)
    results, rows, all_images = [], {}, {}
    for model_label, model in (("fine-tune", finetuned), ("base", base)):
        pipe = load_pipeline(model, device=device)
        load_stack(pipe, {"accel": accel_lora})
        cells = [Cell(f"{model_label} DDIM {ref_steps}", "ddim", ref_steps, guidance, {}),
                 Cell(f"{model_label} DDIM {steps}", "ddim", steps, guidance, {}),
                 Cell(f"{model_label} LCM {steps}", "lcm", steps, 1.0, {}),  # the same sampler, no adapter
                 Cell(f"{model_label} + accel LCM {steps}", "lcm", steps, 1.0, {"accel": 1.0})]
        for cell in cells:
            r, images = evaluate_cell(pipe, ["accel"], prompts, cell, seed=seed)
            r["share_large"] = _size_share(images)
            r["model"] = model
            all_images[cell.label] = images
            results.append(r)
            rows[cell.label] = images[:grid_prompts]
            print(f"{cell.label:28s} acc {r['prompt_accuracy']:.3f} toy-FID {r['toy_fid']:.2f} "
                  f"large {r['share_large']:.3f}", flush=True)
    for r in results:  # how far each cell's images are from the same-seed images of the base's own cell
        twin = r["label"].replace("fine-tune", "base")
        r["mean_abs_pixel_diff_vs_base"] = float(np.abs(all_images[r["label"]].astype(np.float64)
                                                        - all_images[twin].astype(np.float64)).mean() / 255)
    prompt_large = float(np.mean(["large" in p for p in prompts]))
    info = {}
    ft_card = Path(finetuned) / "stepdistill_finetune.json"
    if ft_card.exists():
        info = json.loads(ft_card.read_text())
    info["relative_weight_change"] = relative_weight_change(base, finetuned)
    report = {"base": base, "finetuned": finetuned, "finetune": info, "accel_lora": str(accel_lora),
              "n_prompts": n_prompts, "share_large_prompts": prompt_large, "seed": seed, "guidance": guidance,
              "cells": results}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    lines = ["# Transfer of an acceleration LoRA to a fine-tuned base (toy world)", "",
             f"Fine-tune of `{base}`: {info.get('description', '?')}, {info.get('steps', '?')} full-UNet steps "
             f"(batch {info.get('batch_size', '?')}, lr {info.get('learning_rate', '?')}; relative weight change "
             f"{info.get('relative_weight_change', float('nan')):.4f}). Acceleration LoRA `{accel_lora}` applied "
             f"unchanged. {n_prompts} prompts, {prompt_large:.2f} of them ask for large shapes. Pixel diff: mean "
             "|image - same-seed image of the base in the same cell| (0..1).",
             "", "| cell | prompt acc | toy-FID | share classified large | hollow-style strength | pixel diff vs base "
                 "| s/img |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['prompt_accuracy']:.3f} | {r['toy_fid']:.2f} | {r['share_large']:.3f} | "
                     f"{r['style_strength']:.3f} | {r['mean_abs_pixel_diff_vs_base']:.4f} | {r['sec_per_image']:.4f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    grid = image_grid(list(rows.values()), row_labels=list(rows),
                      col_labels=list(prompts[:grid_prompts]), scale=3)
    grid.save(out / "grid.png")
    return report


# ----------------------------------------------------------------------------------------------- CLI
