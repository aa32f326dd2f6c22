"""Issue 13's one-step student at GPU scale, in one time-boxed run: many teacher couplings, a long one-step
regression, sibling runs from it, their average (a model soup), and the 400-prompt evaluation beside the teacher,
the committed LCM-LoRA and the base model with no adapter.

On the CPU the one-step regression is data-bound: it memorises its 8192-16384 couplings (held-out loss 5x the
training loss, docs/results.md) and its best soup scores 766 toy-FID at 400 prompts against the 666 the bar
needs. A GPU makes couplings nearly free (the toy UNet is 2.4M parameters on 8x8 latents), so this run trains on
10^5 of them at a large batch. Every stage is sized from what was measured earlier in the same run (couplings per
second, the training loop's own seconds per step under concurrency, its start-up) so the whole run ends inside
``--budget`` seconds; every stage's outputs are copied to ``$OUT`` as they exist.

    python bench/onestep_gpu.py --out $OUT                     # device run (carry .whl: diffusers, peft, ...)
    python bench/onestep_gpu.py --out /tmp/smoke --smoke       # CPU code-path check, tiny sizes (~2.5 minutes)

The device run, as one call (``run`` with ``carry: [".whl"]``, ``timeout_s: 600``; ``.whl`` holds the wheels of
diffusers 0.42.1, peft 0.21.2, transformers 5.23.0, webdataset 1.0.2 and braceexpand 0.1.7: ``bash
bench/gpu_wheels.sh`` downloads them as the device README shows)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site && python3 bench/onestep_gpu.py --out $OUT

Commands are the CLI's (``python -m stepdistill.cli ...``), so every row of the summary has its command in
``commands.txt``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = "configs/toy-adversarial-reflow.yaml"
ACCEL = "stepdistill/toy/weights/lcm-lora"
# the one-step regression of docs/results.md (gan_loss_weight=0: the reflow term alone), at rank 96
REGRESSION = ["gan_loss_weight=0", "lora_rank=96", "lr_scheduler=cosine", "checkpointing_steps=0",
              "report_to=none", "validation_steps=0"]
# (name, keys, factor on the chosen start's learning rate): they differ in batch order, loss or learning rate, as
# the CPU soups' members did
SIBLINGS = [
    ("s1", ["seed=1"], 1.0),
    ("s2", ["seed=2", "reflow_loss_type=pseudo_huber"], 1.0),
    ("s3", ["seed=3"], 0.5),
    ("s4", ["seed=4"], 1.0),
]
RATE = re.compile(r"distillation: +\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*?, +([\d.]+)(it/s|s/it)")  # the loop's bar


class Run:
    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.summary: dict = {"smoke": args.smoke, "budget_s": args.budget, "stages": {}}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "5",
                    "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}

    def left(self) -> float:
        return self.args.budget - (time.time() - self.t0)

    def say(self, text: str):
        line = f"[{time.time() - self.t0:6.0f} s] {text}"
        print(line, flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(line + "\n")

    def cli(self, *argv: str) -> list[str]:
        command = [sys.executable, "-m", "stepdistill.cli", *argv]
        with open(self.out / "commands.txt", "a") as f:
            f.write(" ".join(["stepdistill", *argv]) + "\n")
        return command

    def start(self, command: list[str], name: str) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "w")
        return subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, procs: dict[str, subprocess.Popen], timeout: float) -> dict[str, int | None]:
        """Wait for every process until ``timeout`` seconds from now; kill the rest. Returns the exit codes
        (None: killed at the limit)."""
        end, codes = time.time() + max(timeout, 1.0), {}
        for name, p in procs.items():
            try:
                codes[name] = p.wait(timeout=max(end - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes[name] = None
            if codes[name] != 0:
                tail = (self.work / f"{name}.log").read_text(errors="replace").replace("\r", "\n").splitlines()
                self.say(f"{name}: exit {codes[name]}; log tail:\n    " + "\n    ".join(tail[-6:]))
        return codes

    def seconds_per_step(self, name: str) -> float:
        """The training loop's mean seconds per step, from its progress bar's last update: at the close tqdm
        prints the mean rate over the whole loop (its own clock), to two decimals, where the elapsed time has
        whole seconds only."""
        text = (self.work / f"{name}.log").read_text(errors="replace")
        found = RATE.findall(text)
        if not found:
            raise RuntimeError(f"{name}: no progress bar rate in its log")
        value, unit = found[-1]
        return 1.0 / float(value) if unit == "it/s" else float(value)

    def keep(self, src: Path, name: str):
        if src.exists():
            shutil.copy2(src, self.out / name)

    def write_summary(self):
        self.summary["elapsed_s"] = round(time.time() - self.t0, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1))


def couplings(run: Run) -> list[str]:
    """``--max-sets`` sets of ``set_size`` couplings (the teacher at 24 DDIM steps, CFG 2, as on the CPU), one
    directory and one process each, all at once (the toy teacher leaves the GPU idle between its small kernels),
    and a held-out set for the regression's held-out loss. A set not finished within ``couple_seconds`` is left
    out."""
    a = run.args
    sets = {"couplings-heldout": (a.heldout_size, 9)}
    sets.update({f"couplings-{k}": (a.set_size, 10 + k) for k in range(a.max_sets)})
    procs = {}
    for name, (n, k) in sets.items():
        procs[name] = run.start(run.cli(
            "reflow", "couple", "--model", "toy", "--prompts", f"toy:{n}:{k}", "--guidance", "2", "--windows", "1",
            "--steps", "24", "--seed", str(k * 1_000_000), "--out", str(run.work / name), "--batch-size",
            str(a.couple_batch), "--storage-dtype", "float16", "--device", a.device), name)
    t = time.time()
    codes = run.wait(procs, a.couple_seconds)
    seconds = time.time() - t
    dirs = [str(run.work / name) for name, c in codes.items() if c == 0 and name != "couplings-heldout"]
    if codes["couplings-heldout"] != 0 or not dirs:
        raise SystemExit("the couplings did not finish in time")
    run.summary["stages"]["couplings"] = {"sets": len(dirs), "couplings": len(dirs) * a.set_size,
                                          "seconds": round(seconds, 1), "processes": len(procs)}
    run.say(f"couplings: {len(dirs)} sets of {a.set_size} in {seconds:.0f} s")
    return dirs


def train(run: Run, jobs: dict[str, list[str]], steps: int, timeout: float) -> dict[str, int | None]:
    """One ``stepdistill distill`` process per job (its keys, the learning rate among them), all at once."""
    procs = {}
    for name, keys in jobs.items():
        argv = ["distill", "--config", RECIPE, f"output_dir={run.work / name}", f"max_train_steps={steps}",
                f"train_batch_size={run.args.batch}", *REGRESSION, *keys]
        procs[name] = run.start(run.cli(*argv), name)
    return run.wait(procs, timeout)


def lr_key(learning_rate: float) -> str:
    return f"learning_rate={learning_rate:g}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/onestep")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the code path only")
    p.add_argument("--budget", type=float, default=520.0, help="seconds for the whole run")
    args = p.parse_args(argv)
    sizes = dict(device="cuda", set_size=16384, heldout_size=2048, max_sets=8, couple_batch=2048,
                 couple_seconds=100.0, batch=256, learning_rate=7e-4, main_lr_scales=(0.5, 1.0, 2.0, 3.0),
                 warmup=100, probe_steps=150, main_share=0.5, eval_prompts=400, seeds=4, seed_prompts=100,
                 reserve=100.0)
    if args.smoke:
        sizes.update(device="cpu", set_size=64, heldout_size=32, max_sets=2, couple_batch=32, couple_seconds=80.0,
                     batch=8, warmup=2, probe_steps=6, eval_prompts=8, seeds=2, seed_prompts=4, reserve=40.0)
        args.budget = min(args.budget, 240.0)
    for k, v in sizes.items():
        setattr(args, k, v)
    run = Run(args)
    if args.smoke:
        run.env.update(OMP_NUM_THREADS="1")
    run.say(f"start: device {args.device}, budget {args.budget:.0f} s")

    dirs = couplings(run)
    data = [f"couplings_dir={','.join(dirs)}", f"validation_couplings_dir={run.work / 'couplings-heldout'}"]
    run.write_summary()

    # probe: the siblings' concurrency, so the per-step time is the slower one of the two stages
    probe = {f"probe{i}": data + [f"seed={i}", "lr_warmup_steps=0", lr_key(args.learning_rate)]
             for i in range(len(SIBLINGS))}
    t = time.time()
    codes = train(run, probe, args.probe_steps, run.left() - args.reserve)
    wall = time.time() - t
    rates = [run.seconds_per_step(n) for n, c in codes.items() if c == 0]
    if not rates:
        raise SystemExit("the probe runs failed")
    per_step = max(rates)
    startup = max(wall - args.probe_steps * per_step, 5.0)
    run.summary["stages"]["probe"] = {"per_step_s": round(per_step, 4), "startup_s": round(startup, 1),
                                      "processes": len(probe)}
    run.say(f"probe: {per_step * 1000:.1f} ms a step with {len(probe)} processes, start-up {startup:.0f} s")

    # main regression from a zero adapter at four learning rates side by side (the probe's concurrency); the one
    # with the lowest held-out loss is the siblings' shared start (a soup needs one)
    train_s = run.left() - args.reserve
    main_steps = max(int((train_s * args.main_share - startup) / per_step), args.probe_steps)
    main_lr = {f"main-{i}": args.learning_rate * f for i, f in enumerate(args.main_lr_scales)}
    mains = {n: data + [f"lr_warmup_steps={args.warmup}", lr_key(lr)] for n, lr in main_lr.items()}
    codes = train(run, mains, main_steps, train_s * args.main_share + 30)
    heldout = {}
    for name, code in codes.items():
        card = run.work / name / "stepdistill_card.json"
        if code == 0 and card.exists():
            loss = float(json.loads(card.read_text()).get("heldout_loss", "inf"))
            heldout[name] = loss if math.isfinite(loss) else float("inf")  # a diverged run never wins
    if not heldout:
        raise SystemExit("the main regressions failed")
    best = min(heldout, key=heldout.get)
    run.keep(run.work / best / "stepdistill_card.json", "main_card.json")
    run.summary["stages"]["main"] = {"steps": main_steps, "batch": args.batch, "heldout_loss": heldout,
                                     "lr": main_lr,
                                     "chosen": best}
    run.write_summary()
    run.say(f"main: {main_steps} steps, held-out loss {heldout}, siblings start from {best}")
    sib_s = run.left() - args.reserve
    sib_steps = max(int((sib_s - startup) / per_step), args.probe_steps)
    init = f"init_lora={run.work / best / 'pytorch_lora_weights.safetensors'}"
    siblings = {n: data + keys + [init, "lr_warmup_steps=0", lr_key(main_lr[best] * f)] for n, keys, f in SIBLINGS}
    codes = train(run, siblings, sib_steps, sib_s + 20)
    done = [n for n, c in codes.items() if c == 0]
    run.summary["stages"]["siblings"] = {"steps": sib_steps, "finished": done}
    run.say(f"siblings: {sib_steps} steps, finished: {done}")

    soup = run.work / "soup"
    members = [str(run.work / n) for n in done] or [str(run.work / best)]
    if len(members) > 1:
        run.wait({"average": run.start(run.cli("average", *members, "--out", str(soup), "--base", "toy"), "average")},
                 60)
    else:
        shutil.copytree(members[0], soup, dirs_exist_ok=True)
    run.keep(soup / "pytorch_lora_weights.safetensors", "soup.safetensors")
    run.keep(run.work / best / "pytorch_lora_weights.safetensors", "main.safetensors")
    run.write_summary()

    # evaluation: 400 prompts at seed 0 (teacher, soup at 1 and 2 steps, the main run, the LCM-LoRA; the base
    # model rows are added by eval), and the 100-prompt set at seeds 0..3 (teacher and soup), side by side
    dev = ["--device", args.device]
    evals = {"e400": ["eval", "--model", "toy", "--prompts", f"toy:{args.eval_prompts}", "--seed", "0", *dev,
                      "--method", "teacher=:ddim:steps=50:guidance=2", "--method", f"soup={soup}:steps=1,2",
                      "--method", f"main={run.work / best}:steps=1", "--method", f"lcm-lora={ACCEL}:steps=1,2",
                      "--out", str(run.work / "e400")]}
    for s in range(args.seeds):
        evals[f"e100-s{s}"] = ["eval", "--model", "toy", "--prompts", f"toy:{args.seed_prompts}", "--seed", str(s),
                               *dev, "--method", "teacher=:ddim:steps=50:guidance=2",
                               "--method", f"soup={soup}:steps=1", "--out", str(run.work / f"e100-s{s}")]
    codes = run.wait({n: run.start(run.cli(*v), n) for n, v in evals.items()}, run.left() + 40)
    with open(run.out / "eval.md", "w") as f:  # one file: at most 8 come back from a device run
        for name in evals:
            path = run.work / name / "results.md"
            f.write(f"# {name}\n\n" + (path.read_text() if path.exists() else "(no results)\n") + "\n")
    run.summary["stages"]["eval"] = {n: c for n, c in codes.items()}
    run.write_summary()
    run.say("done")


if __name__ == "__main__":
    main()
