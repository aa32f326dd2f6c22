"""Training checkpoints: written whole or not at all, rotated within their own run, checked before they are loaded.

A checkpoint ``<output_dir>/checkpoint-<step>/`` holds accelerate's state (optimizer, LR scheduler, RNG states),
``lora_state.safetensors`` (the adapter, fp32), with ``ema_decay`` ``ema_state.safetensors`` (its moving
average, :mod:`.ema`), ``stepdistill_step.json`` (``{"global_step": N}``) and
``stepdistill_checkpoint.json``: the run it belongs to, the size of every file in it, and the adapter's settings.
It is written to ``.checkpoint-<step>.tmp`` and renamed into place, so a crash never leaves a half-written
``checkpoint-<step>``. Rotation (``checkpoints_total_limit``) only deletes checkpoints of the run being trained.

Before a checkpoint is loaded, :func:`check_checkpoint` verifies it is complete (every recorded file present with
its recorded size, the adapter readable); ``--resume latest`` falls back to the previous complete checkpoint when
the newest is not, and :func:`check_adapter_settings` refuses a checkpoint whose adapter another rank, alpha,
target list, method or ``ema_decay`` would not fit.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, ConfigError
from .config import TrainConfig

CHECKPOINT_PREFIX = "checkpoint-"
STEP_FILE = "stepdistill_step.json"
RECORD_FILE = "stepdistill_checkpoint.json"
LORA_STATE = "lora_state.safetensors"
# the settings a resumed run must share with its checkpoint (the adapter's shape and meaning)
ADAPTER_KEYS = ("method", "lora_rank", "lora_alpha", "lora_target_modules", "ema_decay")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-<step>`` directories in ``output_dir``, by step."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    done = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
            and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def read_record(checkpoint: Path) -> dict:
    """The checkpoint's ``stepdistill_checkpoint.json`` (``{}`` for checkpoints written before it existed)."""
    try:
        return json.loads((checkpoint / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {}


def adapter_settings(config: TrainConfig) -> dict:
    return {"method": config.method, "lora_rank": config.lora_rank,
            "lora_alpha": float(config.lora_alpha if config.lora_alpha is not None else config.lora_rank),
            "lora_target_modules": list(config.lora_target_modules), "ema_decay": config.ema_decay}


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None, run_id: str | None = None,
                    settings: dict | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically; then delete this run's checkpoints beyond ``total_limit``.

    Called on every process: ``save_state`` is a collective under FSDP / DeepSpeed (each process also writes its
    own RNG state); the main process alone prepares the temporary directory, records and renames it."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return final
    (tmp / STEP_FILE).write_text(json.dumps({"global_step": step}))
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / RECORD_FILE).write_text(json.dumps({"global_step": step, "run_id": run_id, "files": files,
                                               "adapter": settings or {}}, indent=1))
    old = None
    if final.exists():  # a resumed run writing a step again: move the old one aside, never leave neither
        old = output_dir / f".{CHECKPOINT_PREFIX}{step}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old)
    if total_limit:
        own = [p for p in list_checkpoints(output_dir) if read_record(p).get("run_id") == run_id]
        for stale in own[:-total_limit]:
            shutil.rmtree(stale)
    return final


def check_checkpoint(checkpoint: Path) -> int:
    """The step of a complete checkpoint; :class:`CheckpointError` naming the file that is missing or damaged."""
    step_file = checkpoint / STEP_FILE
    try:
        step = int(json.loads(step_file.read_text())["global_step"])
    except FileNotFoundError:
        raise CheckpointError(f"{step_file} is missing (an incomplete checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{step_file} is unreadable ({type(e).__name__}: {e})") from None
    for name, size in read_record(checkpoint).get("files", {}).items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path} is damaged ({path.stat().st_size} bytes, written with {size})")
    lora_file = checkpoint / LORA_STATE
    try:
        with safe_open(str(lora_file), framework="pt", device="cpu") as f:
            for k in f.keys():  # noqa: SIM118 -- safe_open is not iterable
                f.get_tensor(k)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{lora_file} is unreadable ({type(e).__name__}: {e})") from None
    return step


def resume_candidates(config: TrainConfig) -> list[Path]:
    """The checkpoints to try, in order: for ``latest`` every checkpoint newest first, else the one named.
    Raises :class:`CheckpointError` when there is none."""
    out = Path(config.output_dir)
    if config.resume_from_checkpoint == "latest":
        found = list_checkpoints(out)
        if not found:
            raise CheckpointError(f"--resume latest: no checkpoint in {out}; start a fresh run without --resume")
        return found[::-1]
    path = Path(config.resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = out / path
    if not path.is_dir():
        available = ", ".join(p.name for p in list_checkpoints(out)) or "none"
        raise CheckpointError(f"checkpoint {config.resume_from_checkpoint} not found (looked at {path}); "
                              f"checkpoints in {out}: {available}; pass one of them or 'latest'")
    return [path]


def check_adapter_settings(checkpoint: Path, config: TrainConfig):
    """Refuse to resume ``checkpoint`` under a config whose adapter differs in rank, alpha, targets or method."""
    recorded = read_record(checkpoint).get("adapter") or {}
    now = adapter_settings(config)
    changed = [k for k in ADAPTER_KEYS if k in recorded and recorded[k] != now[k]]
    if changed:
        diff = ", ".join(f"{k}={recorded[k]!r} there, {now[k]!r} here" for k in changed)
        raise ConfigError(f"{checkpoint} was trained with other adapter settings ({diff}); resume with the "
                          "checkpoint's settings, or start a fresh run (--overwrite, or another output_dir)")


def check_state_shapes(checkpoint: Path, state: dict, expected: dict):
    """The checkpoint's LoRA tensors ``state`` must match the adapter being trained (``expected``: name -> tensor)."""
    file = checkpoint / LORA_STATE
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise ConfigError(f"{file}: {len(bad)} LoRA tensors do not fit this run's adapter, e.g. {k} is "
                          f"{tuple(state[k].shape)} there and {tuple(expected[k].shape)} here (another lora_rank or "
                          "base model?); resume with the checkpoint's settings or start a fresh run (--overwrite)")
    if missing or extra:
        shown = ", ".join((missing or extra)[:3])
        raise ConfigError(f"{file}: its LoRA layers differ from this run's ({len(missing)} missing, {len(extra)} "
                          f"extra, e.g. {shown}; other lora_target_modules or base model?); resume with the "
                          "checkpoint's settings or start a fresh run (--overwrite)")


def warn_fallback(error: Exception, previous: Path):
    warnings.warn(f"{error}; resuming from the previous complete checkpoint {previous} instead", UserWarning,
                  stacklevel=3)
