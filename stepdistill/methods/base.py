"""What every distillation method provides to the training loop, and the parts they share.

A method is a class with::

    name: str                       # the registry key and the ``method`` config value
    method_name: str                # a human name (model card)
    student_guidance: float         # the guidance the student is sampled with
    check_config(config)            # classmethod: refuse settings the method cannot run (ConfigError)
    __init__(config, pipe, accelerator)
    loss(model, raw_model, batch_size, generator) -> (loss, logs)
    set_student_scheduler(pipe)     # the sampler the adapter is meant for
    validate(pipe, accelerator, step)
    card(config) -> dict            # the model card; its scheduler keys go into the adapter's header, which is
                                    # where `stepdistill sample` / `eval` read the sampler from

Adding a method is one module in this package plus one line in ``METHODS`` (``stepdistill/methods/__init__.py``).
The latent cache (:class:`CachedBatches`) is a component a method may use, not a base class.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.cache import precompute
from ..data.sources import load_examples
from ..models.latents import native_resolution
from ..sampling import generate, image_grid


class CachedBatches:
    """Training batches from the precomputed latent/text cache (built on first use, main process first)."""

    def __init__(self, config, pipe, accelerator):
        self.device = accelerator.device
        self.resolution = config.resolution or native_resolution(pipe)
        with accelerator.main_process_first():
            examples = load_examples(config.train_data, config.caption_column, config.image_column)
            self.cache = precompute(pipe, examples, self.resolution, config.resolved_cache_dir,
                                    model_id=config.pretrained_model)

    def batch(self, batch_size: int, gen: torch.Generator):
        """``(latents, cond, uncond)`` for ``batch_size`` examples drawn with ``gen``, on the device."""
        idx = torch.randint(0, len(self.cache), (batch_size,), generator=gen)
        latents = self.cache.latents(idx, gen).to(self.device)
        cond = self._cond(self.cache.caption_index[idx], idx)
        uncond = self._cond(torch.full((batch_size,), self.cache.uncond_index), idx)
        return latents, cond, uncond

    def _cond(self, caption_idx, idx) -> dict:
        cond = self.cache.conditioning(caption_idx)
        cond["encoder_hidden_states"] = cond["encoder_hidden_states"].to(self.device)
        if "added_cond_kwargs" in cond:
            cond["added_cond_kwargs"] = {"text_embeds": cond["added_cond_kwargs"]["text_embeds"].to(self.device),
                                         "time_ids": self.cache.time_ids[idx].to(self.device)}
        return cond


def concat_cond(a: dict, b: dict) -> dict:
    """Two conditioning dicts batched into one forward (conditional and unconditional passes together)."""
    out = {"encoder_hidden_states": torch.cat([a["encoder_hidden_states"], b["encoder_hidden_states"]])}
    if "added_cond_kwargs" in a:
        out["added_cond_kwargs"] = {k: torch.cat([a["added_cond_kwargs"][k], b["added_cond_kwargs"][k]])
                                    for k in a["added_cond_kwargs"]}
    return out


@torch.no_grad()
def validate_with_pipeline(objective, pipe, accelerator, step: int, sample=None):
    """Sample the validation prompts at each validation step count with the student's scheduler (restored
    afterwards) and guidance, and write the grid. ``sample(prompts, steps) -> uint8 images`` replaces the default
    :func:`stepdistill.sampling.generate` call (seed 0) where a family needs its own latents."""
    config = objective.config
    if sample is None:
        def sample(prompts, steps):
            return generate(pipe, prompts, steps=steps, guidance=objective.student_guidance, seed=0)[0]
    previous = pipe.scheduler
    objective.set_student_scheduler(pipe)
    try:
        rows = [sample(config.validation_prompts, n) for n in config.validation_step_counts]
    finally:
        pipe.scheduler = previous
    return write_validation_grid(rows, config, step, accelerator)


def write_validation_grid(rows, config, step: int, accelerator) -> Path:
    """One row of validation images per step count -> ``OUTPUT/validation/step-NNNNNN.png`` (and TensorBoard)."""
    grid = image_grid(rows, row_labels=[f"{n} steps" for n in config.validation_step_counts], scale=3)
    out = Path(config.output_dir) / "validation"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step-{step:06d}.png"
    grid.save(path)
    if config.report_to == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("validation", np.asarray(grid).transpose(2, 0, 1), step)
    return path


def common_card(config) -> dict:
    """The model-card entries every method records."""
    return {"train_steps": config.max_train_steps, "train_batch_size": config.train_batch_size,
            "lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha or config.lora_rank,
            "learning_rate": config.learning_rate}
