"""The held-out loss: the objective's regression term on couplings the run never trains on.

A regression onto a finite set of couplings can memorise it -- docs/results.md measured the one-step regression's
loss on unseen couplings at five times its training loss -- and the training loss alone hides that. With
``validation_couplings_dir`` the loop measures the term (:meth:`regression_loss` of the objective, without the
knowledge-distillation levers) every ``validation_steps`` and at the end, on ``validation_batches`` fixed batches
of those couplings: the same rows, flow times and noise every time, so the curve moves only with the adapter. It
is logged as ``heldout_loss`` beside ``loss`` and written into the model card.

Every process runs the same number of forwards (FSDP and DeepSpeed ZeRO-3 gather weights in each one), taking
every ``num_processes``-th batch; the sums are reduced over processes.
"""
from __future__ import annotations

import math

import torch

from ..methods.base import collate_rows

HELDOUT_SEED = 2_147_483_629  # the measured batches' flow times and noise: apart from every training step's seeds


def heldout_batches(num_rows: int, batch_size: int, num_batches: int) -> list[torch.Tensor]:
    """Row indices of the measured batches: ``num_batches`` batches spread evenly over the set (fewer, covering
    it once, when it is smaller)."""
    total = min(num_rows, batch_size * num_batches)
    rows = torch.linspace(0, num_rows - 1, total).round().long() if total > 1 else torch.zeros(total, dtype=torch.long)
    return list(rows.split(batch_size))


@torch.no_grad()
def heldout_loss(accelerator, model, objective, config) -> float:
    """The mean regression loss per held-out coupling, the same on every process."""
    batches = heldout_batches(len(objective.heldout), config.train_batch_size, config.validation_batches)
    rank, world = accelerator.process_index, accelerator.num_processes
    loss_sum = rows = 0.0
    for j in range(math.ceil(len(batches) / world)):
        b = j * world + rank
        counted = b < len(batches)
        b = b if counted else 0  # a spare forward, not counted: every process calls the model as often
        batch = collate_rows(objective.heldout, batches[b], device=accelerator.device)
        loss, _ = objective.regression_loss(model, batch, torch.Generator().manual_seed(HELDOUT_SEED + b))
        if counted:
            loss_sum, rows = loss_sum + float(loss) * len(batches[b]), rows + len(batches[b])
    sums = torch.tensor([loss_sum, rows], dtype=torch.float64, device=accelerator.device)
    if world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    return float(sums[0] / sums[1])
