"""Checks a training run makes before it writes anything: the output directory (a fresh run never mixes into an
earlier run's directory unless told to replace it), the model source, and mixed precision on the device.
`stepdistill sample` / `eval` use :func:`check_model_source` and :func:`load_model` too."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError
from ..lora import LORA_WEIGHT_NAME
from ..models.pipeline import load_pipeline
from .checkpoints import CHECKPOINT_PREFIX, list_checkpoints
from .config import TrainConfig

CARD_NAME = "stepdistill_card.json"
RECORD_NAMES = ("train_config.json", CARD_NAME)


def previous_run(output_dir: str | Path) -> list[str]:
    """What an earlier run left in ``output_dir`` (checkpoints, the adapter, its card); empty for a fresh directory."""
    out = Path(output_dir)
    found = [p.name for p in list_checkpoints(out)[::-1]]
    found += [name for name in (LORA_WEIGHT_NAME, CARD_NAME) if (out / name).exists()]
    return found


def check_output_dir(config: TrainConfig):
    """A fresh run (no ``resume_from_checkpoint``) into a directory holding another run refuses unless
    ``overwrite``; nothing is written here."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file; pass a directory")
    if config.resume_from_checkpoint or config.overwrite:
        return
    found = previous_run(out)
    if found:
        shown = ", ".join(found[:3]) + (" ..." if len(found) > 3 else "")
        raise ConfigError(f"output_dir {out} already holds a run ({shown}); pass --overwrite (overwrite=true) to "
                          "replace it, --resume latest to continue it, or choose another output_dir")


def clear_previous_run(output_dir: str | Path) -> list[str]:
    """``--overwrite``: delete what an earlier run left (checkpoints, adapter, card, records; the latent cache, logs
    and validation images stay). Returns what was deleted."""
    out = Path(output_dir)
    had_card = (out / CARD_NAME).exists()
    gone = []
    for p in list_checkpoints(out) + sorted(out.glob(f".{CHECKPOINT_PREFIX}*")):
        shutil.rmtree(p)
        gone.append(p.name)
    names = [LORA_WEIGHT_NAME, *RECORD_NAMES, f"diffusers/{LORA_WEIGHT_NAME}"] + (["README.md"] if had_card else [])
    for name in names:
        if (out / name).is_file():
            (out / name).unlink()
            gone.append(name)
    return gone


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1 or model.endswith("/")


def check_model_source(model: str, key: str = "pretrained_model"):
    """``"toy"``, an existing directory or something shaped like a hub id (``org/name``); a path that does not exist
    is a :class:`ConfigError`."""
    if model != "toy" and not Path(model).expanduser().exists() and _looks_like_path(model):
        raise ConfigError(f"{key} {model!r}: no such directory; pass a diffusers pipeline directory, a hub id "
                          "(org/name) or 'toy'")


def load_model(model: str, key: str = "pretrained_model", **kwargs):
    """:func:`stepdistill.models.pipeline.load_pipeline` with one-line errors: a missing path, or a hub id that can
    neither be found in the local cache nor downloaded, is a :class:`ModelError` instead of a chain of tracebacks."""
    check_model_source(model, key)
    device = str(kwargs.get("device") or "")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this machine has no CUDA GPU; pass --device cpu (or leave it out)")
    try:
        return load_pipeline(model, **kwargs)
    except OSError as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        reason = reason if len(reason) <= 120 else reason[:117] + "..."
        raise ModelError(f"{key} {model!r} cannot be loaded ({reason}); pass a local diffusers pipeline directory, "
                         "a hub id this machine can download (or has cached), or 'toy'") from e


def check_mixed_precision(config: TrainConfig, device: torch.device):
    """fp16 autocast needs a CUDA device; on the CPU it fails deep inside a forward pass (Float/Half mismatch)."""
    if config.mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("mixed_precision=fp16 needs a CUDA GPU and this run is on the CPU; use "
                          "mixed_precision=bf16 or mixed_precision=no")
