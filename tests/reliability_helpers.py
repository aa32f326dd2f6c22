"""Shared by tests/test_reliability.py and tests/test_fault_injection.py: a tiny random pipeline saved to disk, a
small image folder, short training configs, and running the CLI as a subprocess."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "stepdistill.cli"]
CAPTIONS = ["a red circle", "a blue square", "a small green triangle", "a big red square"]


def save_tiny_model(path: Path) -> str:
    from stepdistill.toy.teacher import build_random_pipeline

    build_random_pipeline(seed=0).save_pretrained(path)
    return str(path)


def write_image_folder(directory: Path, n: int = 8, seed: int = 0, size: int = 32) -> Path:
    """``n`` random RGB images with .txt captions: training data that does not depend on the toy world."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(directory / f"{i:03d}.png")
        (directory / f"{i:03d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return directory


def train_kwargs(model: str, data: Path, cache: Path, **kw) -> dict:
    """A tiny LCD run: rank 4, batch 2, a checkpoint every step, all kept."""
    return {"pretrained_model": model, "train_data": str(data), "cache_dir": str(cache), "lora_rank": 4,
            "train_batch_size": 2, "max_train_steps": 2, "checkpointing_steps": 1, "checkpoints_total_limit": 100,
            "learning_rate": 1e-3, "report_to": "none", "validation_steps": 0, "w_min": 1.0, "w_max": 3.0, **kw}


def overrides(kwargs: dict) -> list[str]:
    """``key=value`` command-line overrides for ``kwargs``."""
    return [f"{k}={'null' if v is None else v}" for k, v in kwargs.items()]


def cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "STEPDISTILL_DEBUG"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_cli(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], cwd=ROOT, env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def run_main(args: list) -> SimpleNamespace:
    """The CLI in this process (``stepdistill.cli.main``): ``returncode``, ``stdout``, ``stderr`` like a subprocess.
    For rows whose point is the library's behaviour behind the CLI, without another interpreter start (~5 s)."""
    from stepdistill.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run exited with code 2 and printed exactly one ``error: ...`` line (no traceback) holding ``fragments``."""
    tail = res.stderr[-3000:]
    assert res.returncode == 2, f"exit {res.returncode}:\n{tail}"
    assert "Traceback" not in res.stderr, tail
    errors = [line for line in res.stderr.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, tail
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]
