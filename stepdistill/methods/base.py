"""What every distillation method provides to the training loop, and the parts they share.

A method is a class with::

    name: str                       # the registry key and the ``method`` config value
    method_name: str                # a human name (model card)
    student_guidance: float         # the guidance the student is sampled with
    check_config(config)            # classmethod: refuse settings the method cannot run (ConfigError)
    __init__(config, pipe, accelerator)
    dataset                         # a map-style dataset (``__len__``, ``__getitem__(i) -> dict of tensors``): the
                                    # loop reads it through a DataLoader prepared by accelerate (seeded, resumable
                                    # order; optional ``collate`` attribute: the DataLoader's collate_fn); or, with
                                    # ``data_mode: streaming``, a StreamingExamples iterable (images + captions)
    loss(model, raw_model, batch, generator) -> (loss, logs)
                                    # ``batch``: one collated per-device batch of ``dataset``, on the device;
                                    # ``generator``: a CPU generator for the step's other randomness (noise, times)
    set_student_scheduler(pipe)     # the sampler the adapter is meant for
    validate(pipe, accelerator, step)
    card(config) -> dict            # the model card; its scheduler keys go into the adapter's header, which is
                                    # where `stepdistill sample` / `eval` read the sampler from
    after_prepare()                 # optional: called once after ``accelerator.prepare``, where FSDP2 has
                                    # replaced the denoiser's parameters by sharded ones (e.g. the DMD term builds
                                    # its fake score's optimizer here)
    checkpoint_objects() -> list    # optional: more state the loop checkpoints and resumes (objects with
                                    # state_dict / load_state_dict, e.g. the adversarial method's discriminator)
    heldout                         # optional: a dataset the run never trains on (None: none), measured with
    regression_loss(model, batch, generator) -> (loss, ...)  # by the loop (stepdistill/training/heldout.py)

Adding a method is one module in this package plus one line in ``METHODS`` (``stepdistill/methods/__init__.py``).
The real-image data (:func:`image_batches`: the latent cache :class:`CachedBatches`, or :class:`StreamedBatches`)
is a component a method may use, not a base class.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate.utils import send_to_device
from torch.utils.data import Dataset, default_collate

from ..data.cache import build_cache, finish_cache, load_cache
from ..data.sources import iter_examples
from ..data.streaming import StreamingExamples
from ..models.family import encode_prompts, family_of, sdxl_time_ids
from ..models.latents import native_resolution
from ..sampling import generate, image_grid


class EmptyPrompt:
    """The unconditional (empty-prompt) side of real-image data: ``uncond`` (tokens x dim) and, for SDXL,
    ``uncond_pooled`` (a data class sets them from its cache, or :meth:`encoded` runs the text encoder)."""

    def __init__(self, uncond: torch.Tensor, uncond_pooled: torch.Tensor | None = None):
        self.uncond, self.uncond_pooled = uncond, uncond_pooled

    @staticmethod
    def encoded(pipe, device) -> EmptyPrompt:
        """The empty prompt run through ``pipe``'s text encoder(s) once, kept on ``device`` (for data that carry
        no unconditional side: streamed captions, reflow couplings)."""
        out = encode_prompts(pipe, [""], device=device)
        return EmptyPrompt(out["prompt_embeds"][0].to(device),
                           out["pooled"][0].to(device) if "pooled" in out else None)

    def unconditional(self, cond: dict) -> dict:
        """UNet keyword arguments of the empty prompt for a batch conditioned by ``cond`` (same size, dtype and, for
        SDXL, ``time_ids``)."""
        hidden = cond["encoder_hidden_states"]
        n = len(hidden)
        out = {"encoder_hidden_states": self.uncond.expand(n, *self.uncond.shape).to(hidden)}
        if "added_cond_kwargs" in cond:
            extra = cond["added_cond_kwargs"]
            pooled = self.uncond_pooled.expand(n, *self.uncond_pooled.shape).to(extra["text_embeds"])
            out["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": extra["time_ids"]}
        return out


class CachedBatches(EmptyPrompt, Dataset):
    """The precomputed latent/text cache as a map-style dataset read per row from memory-mapped shards: row ``i`` is
    example ``i``'s VAE posterior ``mean``/``std``, its caption's ``encoder_hidden_states`` and, for SDXL, its
    ``text_embeds`` and ``time_ids`` (float32). Built on first use by the sharded builder of
    ``stepdistill cache build``: process ``r`` of ``N`` encodes the shards ``r::N`` (skipping those already done),
    then all wait for each other and the main process writes the manifest first. :meth:`latents` and
    :meth:`conditioning` turn a collated batch into what the UNet takes."""

    def __init__(self, config, pipe, accelerator):
        self.device = accelerator.device
        self.resolution = config.resolution or native_resolution(pipe)
        cache_dir = config.resolved_cache_dir
        plan = build_cache(pipe, iter_examples(config.train_data, config.caption_column, config.image_column),
                           self.resolution, cache_dir, model_id=config.pretrained_model,
                           shard_index=accelerator.process_index, num_shards=accelerator.num_processes,
                           progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()  # every shard is written
        with accelerator.main_process_first():
            finish_cache(cache_dir, plan)
            self.cache = load_cache(cache_dir, expect=plan.fingerprint)
        self.uncond = self.cache.uncond["encoder_hidden_states"].to(self.device)
        pooled = self.cache.uncond.get("text_embeds")
        self.uncond_pooled = None if pooled is None else pooled.to(self.device)

    @property
    def dataset(self):
        """What the training DataLoader reads: this map-style dataset itself."""
        return self

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict:
        return self.cache.row(int(i))

    def latents(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        """A fresh posterior sample (noise from ``gen``) for the batch's examples, scaled as the UNet sees latents."""
        return posterior_sample(batch, gen, self.cache.shift_factor, self.cache.scaling_factor)

    def conditioning(self, batch: dict) -> tuple[dict, dict]:
        """``(cond, uncond)`` UNet keyword arguments for the batch (the unconditional one: the empty prompt)."""
        cond = row_conditioning(batch)
        return cond, self.unconditional(cond)


def posterior_sample(batch: dict, gen: torch.Generator, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """A sample of the VAE posterior ``batch["mean"], batch["std"]`` (noise from ``gen``), shifted and scaled as the
    UNet sees latents."""
    mean, std = batch["mean"], batch["std"]
    noise = torch.randn(mean.shape, generator=gen, dtype=mean.dtype).to(mean.device)
    return (mean + std * noise - shift_factor) * scaling_factor


def row_conditioning(batch: dict) -> dict:
    """UNet keyword arguments from a batch's caption embeddings (``encoder_hidden_states``; for SDXL
    ``text_embeds`` and ``time_ids``)."""
    cond = {"encoder_hidden_states": batch["encoder_hidden_states"]}
    if "text_embeds" in batch:
        cond["added_cond_kwargs"] = {"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"]}
    return cond


class StreamedBatches(EmptyPrompt):
    """``data_mode: streaming``: the same interface as :class:`CachedBatches` with images and captions read while
    training (:class:`~stepdistill.data.streaming.StreamingExamples`, an iterable dataset split over processes and
    DataLoader workers) and the VAE encoder and text encoder(s) run on each batch, on the device."""

    def __init__(self, config, pipe, accelerator):
        self.device = accelerator.device
        self.pipe = pipe
        self.resolution = config.resolution or native_resolution(pipe)
        self.dataset = StreamingExamples(config.train_data, self.resolution, config.seed,
                                         rank=accelerator.process_index, world=accelerator.num_processes,
                                         num_workers=config.dataloader_num_workers,
                                         resample=config.streaming_resample, caption_column=config.caption_column,
                                         image_column=config.image_column)
        self.scaling_factor = float(pipe.vae.config.scaling_factor)
        self.shift_factor = float(getattr(pipe.vae.config, "shift_factor", None) or 0.0)
        self.sdxl = family_of(pipe).name == "sdxl"
        empty = EmptyPrompt.encoded(pipe, self.device)
        self.uncond, self.uncond_pooled = empty.uncond, empty.uncond_pooled

    @torch.no_grad()
    def latents(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        """The VAE posterior of the batch's images, sampled with noise from ``gen``, scaled as the UNet sees
        latents (what :meth:`CachedBatches.latents` gives from the cache). The encoder runs once per batch: the
        posterior is kept in ``batch`` under the cache's keys (``mean``, ``std``) for the step's other terms (the GAN
        term's real data, the KD levers), which draw their own sample from it, as they would from the cache."""
        if "mean" not in batch:
            vae = self.pipe.vae
            post = vae.encode(batch["pixel_values"].to(self.device, vae.dtype)).latent_dist
            batch["mean"], batch["std"] = post.mean.float(), post.std.float()
        return posterior_sample(batch, gen, self.shift_factor, self.scaling_factor)

    @torch.no_grad()
    def conditioning(self, batch: dict) -> tuple[dict, dict]:
        """``(cond, uncond)`` UNet keyword arguments: the batch's captions encoded (once per batch, kept in
        ``batch`` under the cache's keys, like the posterior), and the empty prompt."""
        if "encoder_hidden_states" not in batch:
            emb = encode_prompts(self.pipe, list(batch["caption"]), device=self.device, to_cpu=False)
            batch["encoder_hidden_states"] = emb["prompt_embeds"]
            if self.sdxl:
                time_ids = sdxl_time_ids(self.resolution, self.resolution).expand(len(emb["prompt_embeds"]), -1)
                batch["text_embeds"], batch["time_ids"] = emb["pooled"], time_ids.to(self.device)
        cond = row_conditioning(batch)
        return cond, self.unconditional(cond)


def image_batches(config, pipe, accelerator):
    """The real-image data of a method: the latent cache (``data_mode: cached``) or the stream."""
    if config.data_mode == "streaming":
        return StreamedBatches(config, pipe, accelerator)
    return CachedBatches(config, pipe, accelerator)


def first_batch(dataset, device=None, collate=None) -> dict:
    """A one-example batch of ``dataset`` (its row 0, or the first sample of a stream), for probing shapes."""
    rows = [next(dataset.iter_stream(0))] if isinstance(dataset, StreamingExamples) else dataset
    return collate_rows(rows, [0], device, collate)


def collate_rows(dataset, idx, device=None, collate=None) -> dict:
    """The batch a DataLoader would collate (with ``collate``, default ``default_collate``) from rows ``idx`` of
    ``dataset``, on ``device`` when given."""
    batch = (collate or default_collate)([dataset[int(i)] for i in idx])
    return batch if device is None else send_to_device(batch, device)


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
            "learning_rate": config.learning_rate, "data_mode": config.data_mode}
