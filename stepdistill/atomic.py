"""Atomic file writes: write next to the target (``<path>.tmp``), then ``os.replace`` it into place, so a reader
(or a crash) never sees a half-written file. The parent directory is created when missing; a failed write
removes its temporary file."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


@contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the temporary path to write; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """safetensors ``save_file`` (tensors made contiguous; ``metadata``: string header entries), atomically."""
    with _replacing(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata) if metadata is not None else None)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``Path.write_text(text)``, atomically."""
    with _replacing(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 1) -> None:
    """``obj`` as JSON (``indent`` 1, as the caches' manifests are written), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent))
