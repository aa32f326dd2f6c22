"""Tables and plots of `stepdistill eval` results: ``results.md`` and ``quality_vs_steps.png``."""
from __future__ import annotations

from pathlib import Path

from .specs import QUALITY_KEYS


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
             "| method | sampler | steps | guidance | prompt acc | toy-FID | precision | recall | FID | CLIP score "
             "| s/image |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    reasons = {}
    for name, m in results["methods"].items():
        sampler = m["sampler"] + (f" (K={m['num_windows']})" if m.get("num_windows") else "")
        for steps in sorted(m["cells"], key=int):
            c = m["cells"][steps]
            for k, why in c.get("unavailable", {}).items():
                reasons.setdefault(k, why)
            lines.append(f"| {name} | {sampler} | {steps} | {m['guidance']:g} | {_fmt(c.get('prompt_accuracy'), '.3f')} | "
                         f"{_fmt(c.get('toy_fid'), '.2f')} | {_fmt(c.get('precision'), '.2f')} | "
                         f"{_fmt(c.get('recall'), '.2f')} | {_fmt(c.get('fid'), '.2f')} | "
                         f"{_fmt(c.get('clip_score'), '.2f')} | {c['sec_per_image']:.4f} |")
    if reasons:
        lines += ["", "Unavailable metrics:"] + [f"- {k}: {why}" for k, why in reasons.items()]
    lines += ["", "Prompt accuracy: share of images in which the toy classifier reads back every attribute the prompt "
              "names; toy-FID: Fréchet distance of toy-classifier features to renders of the same prompts with what "
              "they leave open drawn freely; precision / recall (k = 3): blur lowers the first, mode collapse the "
              "second. Compare a student with the base model under the same sampler and guidance (a baseline row). "
              "s/image is wall time of the pipeline call (not reproducible; everything else is).", ""]
    return "\n".join(lines)


def plot_quality_vs_steps(results: dict, path: str | Path):
    import matplotlib  # optional: plots only (the `plot` extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional, as above

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

