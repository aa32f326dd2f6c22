"""Prompt sources for couplings and evaluation: ``toy:N[:SEED]`` or a text file with one prompt per line."""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..toy.world import evaluation_prompts
from .sources import read_text_file


def read_prompts(source: str, n: int | None = None, seed: int = 0) -> tuple[list[str], str]:
    """``toy:N`` or ``toy:N:SEED`` (``evaluation_prompts(N, SEED)``; ``seed`` when SEED is absent; plain ``toy`` is
    ``n`` or 200 prompts), or a text file (one prompt a line; blank lines and lines starting with ``#``
    skipped; the first ``n`` when ``n`` is given). Returns ``(prompts, description)``."""
    if source.startswith("toy:") or source == "toy":
        parts = source.split(":")
        try:
            count = int(parts[1]) if len(parts) > 1 else (n or 200)
            seed = int(parts[2]) if len(parts) > 2 else seed
        except ValueError:
            raise DataError(f"prompt source {source!r}: expected toy:N or toy:N:SEED") from None
        if count < 1:
            raise DataError(f"prompt source {source!r}: N must be >= 1")
        return evaluation_prompts(count, seed=seed), f"toy:{count} (evaluation_prompts seed {seed})"
    path = Path(source)
    if not path.is_file():
        raise DataError(f"prompt source {source!r} is neither toy:N nor a text file with one prompt per line")
    prompts = [line.strip() for line in read_text_file(path).splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if n is not None:
        prompts = prompts[:n]
    if not prompts:
        raise DataError(f"{path} holds no prompts; write one prompt per line")
    return prompts, str(path)
