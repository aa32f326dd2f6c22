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

Method specs (``--method``, repeatable)::

    SPEC    := [NAME "="] [LORAS] [":" SAMPLER] (":" OPTION)*
    LORAS   := LORA ("+" LORA)*          LORA := PATH ["@" WEIGHT]
    OPTION  := steps=1,2,4 | guidance=1.5 | windows=4 | eta=0.3

``teacher`` (or ``teacher:ddim``, or any spec without LoRAs) is the base model: default sampler DDIM
(trailing spacing below 25 steps), steps ``--teacher-steps`` (25,50), guidance ``--teacher-guidance``
(toy prompts: ``TOY_GUIDANCE``; otherwise 7.5). A spec with LoRAs is a student: default steps
``--student-steps`` (1,2,4,8), guidance 1.0, default sampler from the LoRA's ``stepdistill.method``
metadata (``lcd`` -> ``lcm``, ``reflow`` -> ``perflow``). Samplers: ``ddim``, ``lcm``, ``tcd``, ``perflow``
(:class:`~stepdistill.flow_scheduler.PiecewiseRectifiedFlowScheduler`, ``num_windows`` from the option
``windows=``, else the LoRA's ``stepdistill.num_windows`` metadata, else 4), and the other keys of
:data:`stepdistill.sampling.SCHEDULERS`. Examples::

    teacher                          lcd=out/lora:lcm              reflow=out/lora-reflow:perflow
    lcd-tcd=out/lora:tcd:eta=0.3     lcd=out/lora:lcm:steps=1,2,4  teacher-few=:ddim:steps=2,4,8

Outputs (in ``--out``): ``results.json``, ``results.md``, ``quality_vs_steps.png``, ``grid-<method>.png``.
"""
from __future__ import annotations

import json
import platform
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import metrics
from .sampling import SCHEDULERS, generate, image_grid, load_loras_into_pipeline, load_pipeline, set_scheduler

STUDENT_STEPS = (1, 2, 4, 8)
TEACHER_STEPS = (25, 50)
DEFAULT_NUM_WINDOWS = 4
SAMPLERS = ("ddim", "lcm", "tcd", "perflow") + tuple(k for k in SCHEDULERS if k not in ("ddim", "lcm", "tcd"))
QUALITY_KEYS = ("prompt_accuracy", "toy_fid", "fid", "clip_score")
_OPTION_KEYS = ("steps", "guidance", "windows", "eta")


class SpecError(ValueError):
    """A ``--method`` spec that cannot be parsed; the message shows the syntax."""


SPEC_HELP = ("[NAME=][LORA[@WEIGHT][+LORA...]][:SAMPLER][:steps=1,2,4][:guidance=G][:windows=K][:eta=E]; "
             "e.g. 'teacher', 'lcd=out/lora:lcm', 'reflow=out/lora-reflow:perflow'")


@dataclass
class MethodSpec:
    name: str
    loras: list[tuple[str, float]] = field(default_factory=list)
    sampler: str | None = None          # None: from the LoRA metadata (students) or "ddim" (teacher)
    steps: tuple[int, ...] | None = None
    guidance: float | None = None
    num_windows: int | None = None
    eta: float | None = None

    @property
    def is_teacher(self) -> bool:
        return not self.loras


def parse_method(spec: str) -> MethodSpec:
    """Parse one ``--method`` spec (see the module docstring)."""
    text = spec.strip()
    if not text:
        raise SpecError(f"empty method spec; expected {SPEC_HELP}")
    parts = text.split(":")
    head, rest = parts[0], parts[1:]
    sampler, options = None, {}
    for i, part in enumerate(rest):
        if "=" in part:
            key, value = part.split("=", 1)
            if key not in _OPTION_KEYS:
                raise SpecError(f"unknown option {key!r} in method spec {spec!r}; options: {_OPTION_KEYS}; "
                                f"syntax: {SPEC_HELP}")
            options[key] = value
        elif i == 0:
            sampler = part.strip().lower() or None
        else:
            raise SpecError(f"unexpected {part!r} in method spec {spec!r}; syntax: {SPEC_HELP}")
    if sampler is not None and sampler not in SAMPLERS:
        raise SpecError(f"unknown sampler {sampler!r} in {spec!r}; choose one of {list(SAMPLERS)}")
    if "=" in head:
        name, lora_text = head.split("=", 1)
    elif head == "teacher" or head == "":
        name, lora_text = head or "teacher", ""
    else:
        lora_text = head
        name = _default_name(head)
    name = name.strip()
    if not name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise SpecError(f"method name {name!r} in {spec!r} must be letters, digits, '.', '_' or '-'")
    loras = []
    for item in filter(None, lora_text.split("+")):
        path, at, weight = item.rpartition("@")
        if at:
            try:
                loras.append((path, float(weight)))
            except ValueError as e:
                raise SpecError(f"LoRA weight {weight!r} in {spec!r} is not a number") from e
        else:
            loras.append((item, 1.0))
    try:
        steps = tuple(int(s) for s in options["steps"].split(",") if s) if "steps" in options else None
        guidance = float(options["guidance"]) if "guidance" in options else None
        windows = int(options["windows"]) if "windows" in options else None
        eta = float(options["eta"]) if "eta" in options else None
    except ValueError as e:
        raise SpecError(f"bad option value in {spec!r}: {e}; syntax: {SPEC_HELP}") from e
    if steps is not None and (not steps or min(steps) < 1):
        raise SpecError(f"steps in {spec!r} must be positive integers")
    return MethodSpec(name, loras, sampler, steps, guidance, windows, eta)


def _default_name(lora_text: str) -> str:
    p = Path(lora_text.split("+")[0].rpartition("@")[0] or lora_text.split("+")[0])
    base = p.parent.name if p.suffix == ".safetensors" else p.name
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", base) or "student"


# ---------------------------------------------------------------------------------------------- prompts

def load_prompts(source: str, n: int | None = None, seed: int = 0) -> tuple[list[str], str]:
    """``toy:N`` (``evaluation_prompts(N, seed)``) or a text file (one prompt a line; blank lines and lines
    starting with ``#`` skipped; the first ``n`` when ``n`` is given). Returns (prompts, description)."""
    from .toy.world import evaluation_prompts

    if source.startswith("toy:") or source == "toy":
        count = int(source.split(":", 1)[1]) if ":" in source else (n or 200)
        return evaluation_prompts(count, seed=seed), f"toy:{count} (evaluation_prompts seed {seed})"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt source {source!r} is neither 'toy:N' nor a text file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if n is not None:
        prompts = prompts[:n]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts, str(path)


def are_toy_prompts(prompts: list[str]) -> bool:
    from .toy.scenes import parse_caption

    try:
        for p in prompts:
            parse_caption(p)
    except ValueError:
        return False
    return True


def toy_reference_images(prompts: list[str], seed: int = metrics.REFERENCE_SEED) -> np.ndarray:
    """Real rendered scenes for the same prompts (jittered), the reference set of Inception FID on toy prompts."""
    from .toy.scenes import parse_caption, render

    return np.stack([render(parse_caption(p), rng=np.random.default_rng(seed + i)) for i, p in enumerate(prompts)])


def load_reference_images(directory: str | Path, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    from .data import IMAGE_SUFFIXES

    files = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise metrics.MetricUnavailable(f"reference image folder {directory} holds fewer than 2 images")
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize(size[::-1], Image.BICUBIC)) for f in files])


# ---------------------------------------------------------------------------------------------- samplers

def lora_metadata(loras: list[tuple[str, float]]) -> list[dict[str, str]]:
    from . import lora_io

    out = []
    for path, _ in loras:
        file = lora_io._resolve_file(path) if Path(path).is_dir() else Path(path)
        if not file.exists():
            raise FileNotFoundError(f"LoRA file {file} not found")
        out.append(lora_io.read_lora(file)[1])
    return out


def resolve_method(spec: MethodSpec, teacher_steps, student_steps, teacher_guidance: float) -> dict:
    """Fill a spec's defaults: sampler, steps, guidance, num_windows (reads the LoRAs' metadata)."""
    meta = lora_metadata(spec.loras) if spec.loras else []
    kinds = {m.get("stepdistill.method", "") for m in meta} - {""}
    sampler = spec.sampler
    if sampler is None:
        if spec.is_teacher:
            sampler = "ddim"
        elif kinds == {"lcd"}:
            sampler = "lcm"
        elif kinds == {"reflow"}:
            sampler = "perflow"
        else:
            raise SpecError(f"method {spec.name!r}: cannot tell the sampler from the LoRA metadata "
                            f"(stepdistill.method = {sorted(kinds) or 'absent'}); add ':lcm', ':tcd' or ':perflow'")
    num_windows = None
    if sampler == "perflow":
        num_windows = spec.num_windows
        if num_windows is None:
            found = [int(m["stepdistill.num_windows"]) for m in meta if "stepdistill.num_windows" in m]
            num_windows = found[0] if found else DEFAULT_NUM_WINDOWS
    steps = spec.steps or (tuple(teacher_steps) if spec.is_teacher else tuple(student_steps))
    guidance = spec.guidance if spec.guidance is not None else (teacher_guidance if spec.is_teacher else 1.0)
    return {"name": spec.name, "loras": [[p, w] for p, w in spec.loras], "sampler": sampler,
            "steps": sorted(set(steps)), "guidance": guidance, "num_windows": num_windows, "eta": spec.eta,
            "lora_methods": sorted(kinds)}


def apply_sampler(pipe, sampler: str, steps: int, num_windows: int | None = None):
    """Put the method's scheduler on ``pipe`` for a ``steps``-step run, always built from the pipeline's original
    scheduler config (remembered on first use), so one run's settings never leak into the next: DDIM gets
    trailing spacing below 25 steps and the model's own spacing from 25 on (``set_scheduler(..., trailing=False)``
    alone would keep a previous run's trailing spacing)."""
    base = getattr(pipe, "_stepdistill_base_scheduler", None)
    if base is None:
        base = pipe.scheduler
        pipe._stepdistill_base_scheduler = base
    pipe.scheduler = base
    if sampler == "perflow":
        from .flow_scheduler import PiecewiseRectifiedFlowScheduler

        pipe.scheduler = PiecewiseRectifiedFlowScheduler.from_config(
            base.config, num_windows=num_windows or DEFAULT_NUM_WINDOWS)
    elif sampler == "ddim":
        set_scheduler(pipe, "ddim", trailing=steps < 25)
    else:
        set_scheduler(pipe, sampler)
    return pipe


from .sampling import STEP_NOISE_SEED_OFFSET  # noqa: E402,F401  (re-exported)


def seeded_generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int = 0, batch_size: int = 64,
                    **pipe_kwargs):
    """:func:`stepdistill.sampling.generate`, which seeds both the initial noise (image ``i``: ``seed + i``) and
    the noise stochastic samplers (LCM multi-step, TCD with ``eta > 0``) inject between steps
    (``STEP_NOISE_SEED_OFFSET + seed + i``), so a rerun gives the same images."""
    return generate(pipe, prompts, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, **pipe_kwargs)


# ---------------------------------------------------------------------------------------------- metrics

def cell_metrics(images: np.ndarray, prompts: list[str], toy: bool, inception_weights=None, clip_model=None,
                 reference_images: np.ndarray | None = None, reference_reason: str | None = None) -> dict:
    cell: dict = {"unavailable": {}}
    if toy:
        cell.update(metrics.prompt_accuracy(images, prompts))
        cell["toy_fid"] = metrics.toy_fid(images) if len(images) >= 2 else None
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
    import diffusers

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    return {"device": name, "device_type": dev.type, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------- main entry

def evaluate(out_dir: str | Path, methods: list[str | MethodSpec] = ("teacher",), model: str = "toy",
             prompts: str | list[str] = "toy:200", seed: int = 0, prompt_seed: int = 0,
             student_steps=STUDENT_STEPS, teacher_steps=TEACHER_STEPS, teacher_guidance: float | None = None,
             inception_weights: str | None = None, clip_model: str | None = None,
             reference_images: str | None = None, grid_prompts: int = 8, batch_size: int = 64,
             device: str | None = None, dtype: torch.dtype | None = None, verbose: bool = True) -> dict:
    """Evaluate each method at each of its step counts; write ``results.json``, ``results.md``,
    ``quality_vs_steps.png`` and ``grid-<method>.png`` into ``out_dir``; return the results dict."""
    from .toy.world import TOY_GUIDANCE

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(prompts, str):
        prompt_list, prompt_source = load_prompts(prompts, seed=prompt_seed)
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
                size = (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
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
                acc = cell.get("prompt_accuracy")
                print(f"{spec.name:>12s} {res['sampler']:>7s} {steps:3d} steps: "
                      + (f"prompt_acc {acc:.3f} toy_fid {cell['toy_fid']:.2f} " if acc is not None else "")
                      + f"{sec:.4f} s/img", flush=True)
        results["methods"][spec.name] = {**res, "cells": cells}
        grid = image_grid(rows, row_labels=[f"{s} steps" for s in res["steps"]],
                          col_labels=[p.replace("a ", "", 1) for p in prompt_list[:grid_prompts]], scale=3)
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


def quality_numbers(results: dict) -> dict:
    """{method: {steps: {metric: value}}} without timings -- what must repeat exactly under fixed seeds."""
    return {m: {s: {k: v for k, v in c.items() if k not in ("sec_per_image",)} for s, c in r["cells"].items()}
            for m, r in results["methods"].items()}


def _fmt(value, fmt: str) -> str:
    return "unavailable" if value is None else format(value, fmt)


def results_markdown(results: dict) -> str:
    env = results.get("environment") or {}
    lines = [f"# Quality vs. steps: `{results['model']}`", "",
             f"Prompts: {results['prompts']['source']} ({results['prompts']['count']} prompts); seed {results['seed']} "
             f"({results['seeding']}); device: {env.get('device', '?')}; torch {env.get('torch', '?')}, "
             f"diffusers {env.get('diffusers', '?')}.", "",
             "| method | sampler | steps | guidance | prompt acc | toy-FID | FID | CLIP score | s/image |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    reasons = {}
    for name, m in results["methods"].items():
        sampler = m["sampler"] + (f" (K={m['num_windows']})" if m.get("num_windows") else "")
        for steps in sorted(m["cells"], key=int):
            c = m["cells"][steps]
            for k, why in c.get("unavailable", {}).items():
                reasons.setdefault(k, why)
            lines.append(f"| {name} | {sampler} | {steps} | {m['guidance']:g} | {_fmt(c.get('prompt_accuracy'), '.3f')} | "
                         f"{_fmt(c.get('toy_fid'), '.2f')} | {_fmt(c.get('fid'), '.2f')} | "
                         f"{_fmt(c.get('clip_score'), '.2f')} | {c['sec_per_image']:.4f} |")
    if reasons:
        lines += ["", "Unavailable metrics:"] + [f"- {k}: {why}" for k, why in reasons.items()]
    lines += ["", "Prompt accuracy: share of images whose shape, colour and background (read by the toy classifier) "
              "match the prompt; toy-FID: Fréchet distance of toy-classifier features to real rendered scenes. "
              "s/image is wall time of the pipeline call (not reproducible; everything else is).", ""]
    return "\n".join(lines)


def plot_quality_vs_steps(results: dict, path: str | Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"prompt_accuracy": "prompt accuracy (higher is better)", "toy_fid": "toy-FID (lower is better)",
              "fid": "FID (lower is better)", "clip_score": "CLIP score (higher is better)"}
    present = [k for k in QUALITY_KEYS if any(c.get(k) is not None for m in results["methods"].values()
                                                 for c in m["cells"].values())]
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(5 * max(1, len(present)), 3.8), squeeze=False)
    axes = axes[0]
    if not present:
        axes[0].text(0.5, 0.5, "no quality metric available\n(see results.md)", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, key in zip(axes, present):
        for name, m in results["methods"].items():
            pts = sorted((int(s), c[key]) for s, c in m["cells"].items() if c.get(key) is not None)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=f"{name} ({m['sampler']})")
        ax.set_xscale("log", base=2)
        steps = sorted({int(s) for m in results["methods"].values() for s in m["cells"]})
        ax.set_xticks(steps)
        ax.set_xticklabels([str(s) for s in steps])
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(labels[key])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['model']}: {results['prompts']['count']} prompts, seed {results['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI

def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


EVAL_EPILOG = """method specs (--method, repeatable; default: teacher):
  SPEC   := [NAME=][LORA[@WEIGHT][+LORA...]][:SAMPLER][:steps=1,2,4][:guidance=G][:windows=K][:eta=E]
  SAMPLER: ddim | lcm | tcd | perflow (PiecewiseRectifiedFlowScheduler; K from windows=, else the LoRA's
           stepdistill.num_windows metadata, else 4) | euler | dpmpp | pndm | flow_euler
  without LoRAs (teacher): DDIM (trailing spacing below 25 steps), --teacher-steps, --teacher-guidance
  with LoRAs (student):    sampler from the LoRA metadata (lcd -> lcm, reflow -> perflow), --student-steps, guidance 1

examples:
  stepdistill eval --method teacher --method lcd=out/demo/lora:lcm --method reflow=out/demo/lora-reflow:perflow
  stepdistill eval --prompts toy:100 --method teacher:ddim:steps=4,25,50 --method tcd=out/demo/lora:tcd:eta=0.3
  stepdistill eval --model DIR --prompts prompts.txt --clip-model CLIP_DIR --method teacher --method lcd=LORA
"""


def cmd_eval(args):
    evaluate(args.out, methods=args.method or ["teacher"], model=args.model, prompts=args.prompts, seed=args.seed,
             prompt_seed=args.prompt_seed, student_steps=args.student_steps, teacher_steps=args.teacher_steps,
             teacher_guidance=args.teacher_guidance, inception_weights=args.inception_weights,
             clip_model=args.clip_model, reference_images=args.reference_images, grid_prompts=args.grid_prompts,
             batch_size=args.batch_size, device=args.device)


def add_eval_command(subparsers):
    """Register ``stepdistill eval`` on an argparse subparsers object."""
    import argparse

    e = subparsers.add_parser(
        "eval", help="quality (prompt accuracy, toy-FID, FID, CLIP) and time vs. steps for teacher and LoRA students",
        description="Sample a fixed prompt set with fixed per-image seeds for each method at each of its step counts; "
                    "report prompt accuracy and toy-FID (toy prompts), FID / CLIP score (with local weights) and "
                    "seconds per image. Writes results.json, results.md, quality_vs_steps.png, grid-<method>.png.",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--model", default="toy", help="'toy', a local pipeline directory or a hub id")
    e.add_argument("--method", action="append", default=[], metavar="SPEC",
                   help=f"repeat per method (default: teacher). {SPEC_HELP}")
    e.add_argument("--prompts", default="toy:200", help="'toy:N' (fixed toy evaluation prompts) or a text file, one prompt a line")
    e.add_argument("--prompt-seed", type=int, default=0, help="seed of the toy prompt set")
    e.add_argument("--seed", type=int, default=0, help="image i starts from noise seed SEED+i")
    e.add_argument("--student-steps", type=_int_list, default=STUDENT_STEPS, help="default steps of LoRA methods (1,2,4,8)")
    e.add_argument("--teacher-steps", type=_int_list, default=TEACHER_STEPS, help="default steps of the base model (25,50)")
    e.add_argument("--teacher-guidance", type=float, default=None, help="CFG scale of the base model (toy prompts: 5, else 7.5)")
    e.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth for FID")
    e.add_argument("--reference-images", default=None, help="folder of reference images for FID (toy prompts: rendered scenes)")
    e.add_argument("--clip-model", default=None, help="local CLIP model directory for CLIP score")
    e.add_argument("--grid-prompts", type=int, default=8, help="columns of grid-<method>.png")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default=None)
    e.add_argument("--out", default="out/eval")
    e.set_defaults(func=cmd_eval)
    return e
