"""Where a step's data and randomness come from, identically under every accelerate engine.

* **Batches**: the objective's map-style ``dataset`` (rows of the latent cache or of the couplings) is read by an
  ordinary :class:`torch.utils.data.DataLoader` (``batch_size`` = the per-device batch, ``drop_last``) that goes
  through ``accelerator.prepare`` with the model: accelerate shards it (process ``r`` of ``N`` takes batches
  ``r, r + N, ...`` of the global stream), moves batches to the device, and gives DeepSpeed its micro-batch size.
  The sampler, :class:`IndexStream`, is an endless stream of dataset indices: epoch ``e`` is the permutation drawn
  from ``SeedSequence((seed, e))``, so position ``p`` of the stream is a function of ``(seed, p)`` alone. A run
  resumed at step ``S`` starts the stream at ``S x accumulation x processes x batch`` (:func:`stream_position`)
  and so replays exactly the batches an uninterrupted run would have drawn, without reading the skipped ones.
* **Per micro-step randomness** (noise, timesteps, posterior samples): :func:`step_generator`, a generator seeded
  from ``numpy.random.SeedSequence((seed, step, micro, rank))`` -- distinct for every (step, micro-step, rank),
  with no arithmetic that could make two of them collide.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from ..errors import StepdistillError

_MASK64 = (1 << 64) - 1


def _entropy(*values: int) -> tuple[int, ...]:
    return tuple(int(v) & _MASK64 for v in values)  # SeedSequence takes non-negative integers only


def step_generator(seed: int, step: int, micro: int = 0, process: int = 0) -> torch.Generator:
    """The CPU generator of micro-step ``micro`` of step ``step`` on process ``process``."""
    state = np.random.SeedSequence(_entropy(seed, step, micro, process)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def step_global_seed(seed: int, step: int, micro: int = 0, process: int = 0) -> int:
    """The seed the loop gives torch's global RNG before micro-step ``micro`` of step ``step`` on process
    ``process``: what draws from it (peft's ``lora_dropout`` masks) repeats on resume. The second word of the same
    ``SeedSequence`` as :func:`step_generator`, so the two streams are independent."""
    return int(np.random.SeedSequence(_entropy(seed, step, micro, process)).generate_state(2, np.uint64)[1])


class IndexStream(Sampler):
    """An endless, seeded stream of indices into a dataset of ``n`` rows: each epoch a fresh permutation
    (``SeedSequence((seed, epoch))``). Set :attr:`start` (a position in the stream) before iterating to resume."""

    def __init__(self, n: int, seed: int, start: int = 0):
        if n < 1:
            raise ValueError("IndexStream needs a non-empty dataset")
        self.n, self.seed, self.start = int(n), int(seed), int(start)

    def permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(_entropy(self.seed, epoch))))
        return rng.permutation(self.n)

    def __iter__(self):
        epoch, offset = divmod(self.start, self.n)
        while True:
            for i in self.permutation(epoch)[offset:]:
                yield int(i)
            epoch, offset = epoch + 1, 0


def stream_position(step: int, accumulation: int, num_processes: int, batch_size: int) -> int:
    """The index-stream position after ``step`` optimizer steps (every process draws one batch per micro-step)."""
    return step * accumulation * num_processes * batch_size


def next_batch(batches):
    """``next(batches)``; a known error raised in a DataLoader worker (which the DataLoader re-raises with the
    worker's traceback in its message) comes back with the worker's own one-line message."""
    try:
        return next(batches)
    except StepdistillError as e:
        text = str(e).strip()
        if "Original Traceback" not in text:
            raise
        last = text.splitlines()[-1]
        raise type(e)(last.split(": ", 1)[1] if ": " in last else last) from None


def make_dataloader(dataset, batch_size: int, seed: int, collate_fn=None, num_workers: int = 0) -> DataLoader:
    """The training DataLoader over ``dataset`` (not yet prepared): for a map-style dataset its sampler is an
    :class:`IndexStream`; an iterable dataset (``data_mode: streaming``) orders and splits its streams itself."""
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, drop_last=True, collate_fn=collate_fn,
                          num_workers=num_workers)
    return DataLoader(dataset, batch_size=batch_size, sampler=IndexStream(len(dataset), seed), drop_last=True,
                      collate_fn=collate_fn, num_workers=num_workers)
