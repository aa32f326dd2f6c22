"""An exponential moving average of the adapter's weights (``ema_decay``), kept beside the trained ones.

After every optimizer step ``theta_ema <- d theta_ema + (1 - d) theta`` with diffusers' ``EMAModel`` warm-up
``d = min(ema_decay, (1 + n) / (10 + n))`` at update ``n`` (Polyak averaging; LCM's target network and the
``--use_ema`` of diffusers' training examples use the same update). Only the LoRA parameters are averaged, so the
copy is as small as the adapter. The adapter written at the end -- and the held-out loss and validation images,
which describe it -- are the average; the checkpoints keep both (the trained weights in ``lora_state.safetensors``,
the average in ``ema_state.safetensors``), so a resumed run continues both exactly.

One process, DDP and DeepSpeed ZeRO-1/2 hold every LoRA weight on every process, so every process keeps the same
average and the main process writes it. FSDP and ZeRO-3 shard those weights; averaging shards is not supported
(:func:`check_ema_engine` refuses them) -- average finished runs with ``stepdistill average`` there.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..engines import shards_weights
from ..errors import CheckpointError, ConfigError

EMA_STATE = "ema_state.safetensors"


def check_ema_engine(accelerator):
    """Refuse ``ema_decay`` where the LoRA weights are sharded over processes (FSDP, DeepSpeed ZeRO-3)."""
    if shards_weights(accelerator):
        raise ConfigError(f"ema_decay is not supported under {accelerator.distributed_type.value} (the LoRA weights "
                          "are sharded): set ema_decay=0, or train under DDP / DeepSpeed ZeRO-2, or average "
                          "finished runs with `stepdistill average`")


class AdapterEMA:
    """The moving average of the named trainable parameters ``named`` (``[(name, parameter), ...]``)."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.average = EMAModel(self.params, decay=decay)

    def update(self):
        """Fold the current weights into the average (once per optimizer step)."""
        self.average.step(self.params)

    @contextlib.contextmanager
    def swapped_in(self):
        """Within the block the parameters hold the average; the trained weights come back after it."""
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)

    def copy_to_params(self):
        """Replace the trained weights by the average for good (the end of the run)."""
        self.average.copy_to(self.params)

    def save(self, directory: str | os.PathLike):
        tensors = {n: s.detach().float().contiguous().cpu() for n, s in zip(self.names, self.average.shadow_params)}
        save_file(tensors, os.path.join(directory, EMA_STATE),
                  metadata={"optimization_step": str(self.average.optimization_step),
                            "decay": repr(self.average.decay)})

    def load(self, checkpoint: Path):
        """Restore the average saved in ``checkpoint``; one-line :class:`CheckpointError` if it is absent,
        unreadable or does not fit this adapter."""
        file = Path(checkpoint) / EMA_STATE
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint was written without ema_decay; resume with "
                                  "ema_decay=0, or start a fresh run (--overwrite)")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                step = int((f.metadata() or {})["optimization_step"])
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not iterable
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"{file} is unreadable ({type(e).__name__}: {e})") from None
        bad = [n for n, p in zip(self.names, self.params) if n not in state or state[n].shape != p.shape]
        if bad or len(state) != len(self.names):
            raise CheckpointError(f"{file} does not fit this run's adapter (e.g. {(bad or sorted(state))[0]}); resume "
                                  "with the checkpoint's settings or start a fresh run (--overwrite)")
        for n, s in zip(self.names, self.average.shadow_params):
            s.copy_(state[n].to(dtype=s.dtype, device=s.device))
        self.average.optimization_step = step
