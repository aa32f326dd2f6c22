"""Peak RSS of the latent-cache build and of a few training steps, as the number of examples grows.

Each measurement is its own subprocess (the real command line: ``stepdistill cache build`` and then
``stepdistill distill`` on the cache it built), and its peak RSS is the child's ``ru_maxrss`` from ``os.wait4``
(so measurements do not mix). The data is the toy world with unique captions (``toy:N:0:unique``: every caption
gets a `` #i`` suffix, so nothing is shared between examples -- the worst case for a caption table).

    OMP_NUM_THREADS=1 python bench/bench_memory.py --sizes 2000 10000 50000 --steps 5

Appends a section to bench/RESULTS.md (``--no-write`` to only print). Done when the peak RSS grows by less than
15% from the smallest to the largest size, for the build and for training.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "toy-lcm-lora.yaml"


def _status_kb(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                    if k in ("RssAnon", "RssFile", "RssShmem")}
    except (OSError, ValueError):
        return {}


def peak_rss_mb(cmd: list[str], log: Path) -> tuple[float, float, float, float]:
    """Run ``cmd``: its peak RSS in MB (``ru_maxrss`` of this child only), the peaks of its anonymous and file-backed
    resident memory (``/proc/PID/status``, sampled every 50 ms), and its wall time in seconds."""
    t0 = time.perf_counter()
    anon = file = 0
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "TQDM_DISABLE": "1"})
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            st = _status_kb(proc.pid)
            anon, file = max(anon, st.get("RssAnon", 0)), max(file, st.get("RssFile", 0))
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return usage.ru_maxrss / 1024, anon / 1024, file / 1024, time.perf_counter() - t0


def report(text: str, write: bool = True):
    """Print a results section and (``write``) append it to bench/RESULTS.md."""
    print(text)
    if write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + text)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000])
    p.add_argument("--steps", type=int, default=5, help="training steps after the build")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    cli = [sys.executable, "-m", "stepdistill.cli"]
    rows = []
    try:
        for n in args.sizes:
            common = ["--config", str(RECIPE), f"train_data=toy:{n}:0:unique", f"output_dir={work / str(n)}"]
            build, b_anon, b_file, build_s = peak_rss_mb([*cli, "cache", "build", *common], work / f"build-{n}.log")
            train, t_anon, t_file, train_s = peak_rss_mb(
                [*cli, "distill", *common, f"max_train_steps={args.steps}", "checkpointing_steps=0",
                 "validation_steps=0"], work / f"train-{n}.log")
            disk = sum(f.stat().st_size for f in (work / str(n) / "cache").iterdir()) / 1e6
            rows.append((n, build, b_anon, b_file, build_s, train, t_anon, t_file, train_s, disk))
            print(f"N={n}: build {build:.0f} MB (anon {b_anon:.0f}, file {b_file:.0f}; {build_s:.0f} s), "
                  f"train {train:.0f} MB (anon {t_anon:.0f}, file {t_file:.0f}; {train_s:.0f} s), "
                  f"cache {disk:.1f} MB on disk", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first, last = rows[0], rows[-1]
    growth_build, growth_train = last[1] / first[1] - 1, last[5] / first[5] - 1
    anon_build, anon_train = last[2] / first[2] - 1, last[6] / first[6] - 1
    lines = [f"## bench_memory: peak RSS of cache build and training vs N ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", (f"- machine: {platform.machine()}, {os.cpu_count()} cores visible (shared), "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"),
             (f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python bench/bench_memory.py "
             f"--sizes {' '.join(map(str, args.sizes))} --steps {args.steps}`"),
             ("- each figure: one subprocess (`stepdistill cache build --config configs/toy-lcm-lora.yaml "
             "train_data=toy:N:0:unique`, then `stepdistill distill` with the same settings for "
             f"{args.steps} steps on that cache), peak RSS = the child's `ru_maxrss`; captions all distinct; "
             "anon / file: peaks of the child's `RssAnon` / `RssFile` (sampled every 50 ms)"), "",
             ("| examples | build peak RSS (anon / file) | build time | training peak RSS (anon / file) | training time "
             "| cache on disk |"), "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {b:.0f} MB ({ba:.0f} / {bf:.0f}) | {bs:.0f} s | {t:.0f} MB ({ta:.0f} / {tf:.0f}) | {ts:.0f} s "
              f"| {d:.1f} MB |" for n, b, ba, bf, bs, t, ta, tf, ts, d in rows]
    verdict = "under" if max(growth_build, growth_train) < 0.15 else "NOT under"
    lines += ["", (f"- growth {first[0]} -> {last[0]}: build {growth_build:+.1%}, training {growth_train:+.1%} "
              f"({verdict} the 15% target); anonymous memory: build {anon_build:+.1%}, training {anon_train:+.1%}"), ""]
    report("\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
