"""``data_mode: streaming`` against the latent cache: peak RSS as the number of examples grows, and the cost of a
training step (the VAE and text encoder run on every batch), side by side in one run.

The data is the toy world with unique captions (``toy:N:0:unique``) written as WebDataset shards of 1000 samples
(``stepdistill data webdataset``). Every measurement is the real command line in its own subprocess
(``stepdistill distill --config configs/toy-lcm-lora.yaml ...``); peak RSS is the child's ``ru_maxrss``. The step
cost is ``(T(long) - T(short)) / (long - short steps)`` of two runs that differ only in ``max_train_steps`` (start-up
cancels out), the median over ``--repeats``.

    OMP_NUM_THREADS=1 python bench/bench_streaming.py --sizes 2000 50000

Appends a section to bench/RESULTS.md (``--no-write`` to only print).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_memory import RECIPE, ROOT, peak_rss_mb, report

CLI = [sys.executable, "-m", "stepdistill.cli"]


def write_shards(n: int, out: Path):
    subprocess.run([*CLI, "data", "webdataset", f"toy:{n}:0:unique", "--out", str(out), "--shard-size", "1000"],
                   cwd=ROOT, check=True, capture_output=True)


def train(work: Path, name: str, data: list[str], steps: int) -> tuple[float, float]:
    """(peak RSS MB, wall seconds) of one training run."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*CLI, "distill", "--config", str(RECIPE), f"output_dir={out}", f"max_train_steps={steps}",
           "checkpointing_steps=0", "validation_steps=0", *data]
    rss, _, _, seconds = peak_rss_mb(cmd, work / f"{name}.log")
    return rss, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 50000])
    p.add_argument("--short", type=int, default=5)
    p.add_argument("--long", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    rss_rows, step_rows = [], []
    try:
        for n in args.sizes:
            write_shards(n, work / f"wds-{n}")
            stream = ["data_mode=streaming", f"train_data={work / f'wds-{n}'}/*.tar"]
            row = [n]
            for workers in (0, 2):
                rss, _ = train(work, f"s{n}-w{workers}", [*stream, f"dataloader_num_workers={workers}"], args.short)
                row.append(rss)
            rss_rows.append(row)
            print(f"N={n}: streaming peak RSS {row[1]:.0f} MB (0 workers), {row[2]:.0f} MB (2 workers)", flush=True)
        n = args.sizes[0]
        cached = [f"train_data=toy:{n}:0:unique", f"cache_dir={work / 'cache'}"]
        subprocess.run([*CLI, "cache", "build", "--config", str(RECIPE), f"output_dir={work / 'c'}", *cached],
                       cwd=ROOT, check=True, capture_output=True)
        modes = {"cached": cached,
                 "streaming, 0 workers": ["data_mode=streaming", f"train_data={work / f'wds-{n}'}/*.tar"],
                 "streaming, 2 workers": ["data_mode=streaming", f"train_data={work / f'wds-{n}'}/*.tar",
                                          "dataloader_num_workers=2"]}
        per_step = {m: [] for m in modes}
        for _ in range(args.repeats):  # interleaved, so drift hits every mode alike
            for mode, data in modes.items():
                _, t_short = train(work, "t", data, args.short)
                _, t_long = train(work, "t", data, args.long)
                per_step[mode].append((t_long - t_short) / (args.long - args.short))
        step_rows = [(m, statistics.median(v)) for m, v in per_step.items()]
        for m, v in step_rows:
            print(f"{m}: {v * 1000:.0f} ms/step", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = step_rows[0][1]
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    lines = [f"## bench_streaming: data_mode streaming vs cached ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", f"- machine: {platform.machine()}, {os.cpu_count()} cores visible (shared), OMP_NUM_THREADS={threads}",
             (f"- command: `OMP_NUM_THREADS={threads} python bench/bench_streaming.py --sizes "
              f"{' '.join(map(str, args.sizes))} --short {args.short} --long {args.long} --repeats {args.repeats}`"),
             ("- toy LCM-LoRA recipe (batch 32), toy:N:0:unique written as WebDataset shards of 1000; peak RSS of "
              f"`stepdistill distill ... data_mode=streaming` for {args.short} steps (the training process; DataLoader "
              "workers are processes of their own, each holding its batch in flight)"), "",
             "| examples | streaming peak RSS, 0 workers | 2 workers |", "|---|---|---|"]
    lines += [f"| {n} | {a:.0f} MB | {b:.0f} MB |" for n, a, b in rss_rows]
    first, last = rss_rows[0], rss_rows[-1]
    lines += ["", (f"- growth {first[0]} -> {last[0]}: {last[1] / first[1] - 1:+.1%} (0 workers), "
                   f"{last[2] / first[2] - 1:+.1%} (2 workers)"), "",
              (f"Step cost at N={args.sizes[0]} (median of {args.repeats}; (T({args.long} steps) - T({args.short} "
               "steps)) / difference; toy VAE and text encoder, so the ratio is not SD's):"), "",
              "| data | ms per step | vs cached |", "|---|---|---|"]
    lines += [f"| {m} | {v * 1000:.0f} | {v / base:.2f}x |" for m, v in step_rows]
    report("\n".join(lines) + "\n", write=not args.no_write)


if __name__ == "__main__":
    main()
