"""The two losses the training loop can optimise, each with its data, validation and model card.

- ``LCDObjective``: latent consistency distillation (LCM, Luo et al. 2023, Algorithm 1 / eq. 9 with the
  LoRA variant of LCM-LoRA: no EMA target network, no guidance embedding).
- ``ReflowObjective``: rectified-flow regression on teacher couplings (Liu et al. 2022, eq. 1;
  piecewise windows as PeRFlow) — defined in ``stepdistill.reflow_objective``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import lcd, parametrization, solvers
from .config import TrainConfig


def build_objective(config: TrainConfig, pipe, accelerator):
    if config.method == "lcd":
        return LCDObjective(config, pipe, accelerator)
    from .reflow_objective import ReflowObjective

    return ReflowObjective(config, pipe, accelerator)


def native_resolution(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def _concat_cond(a: dict, b: dict) -> dict:
    out = {"encoder_hidden_states": torch.cat([a["encoder_hidden_states"], b["encoder_hidden_states"]])}
    if "added_cond_kwargs" in a:
        out["added_cond_kwargs"] = {k: torch.cat([a["added_cond_kwargs"][k], b["added_cond_kwargs"][k]])
                                    for k in a["added_cond_kwargs"]}
    return out


class CachedDataObjective:
    """Shared by both objectives: the latent/text cache and batch assembly."""

    def __init__(self, config: TrainConfig, pipe, accelerator):
        from .data import load_examples
        from .precompute import precompute

        self.config = config
        self.device = accelerator.device
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.base_model = config.pretrained_model
        resolution = config.resolution or native_resolution(pipe)
        self.resolution = resolution
        with accelerator.main_process_first():
            examples = load_examples(config.train_data, config.caption_column, config.image_column)
            self.cache = precompute(pipe, examples, resolution, config.resolved_cache_dir,
                                    model_id=config.pretrained_model)

    def batch(self, batch_size: int, gen: torch.Generator):
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

    @torch.no_grad()
    def validate(self, pipe, accelerator, step: int):
        from .sampling import generate

        previous = pipe.scheduler
        self.set_student_scheduler(pipe)
        prompts = self.config.validation_prompts
        rows = [generate(pipe, prompts, steps=n, guidance=self.student_guidance, seed=0)[0]
                for n in self.config.validation_step_counts]
        pipe.scheduler = previous
        write_validation_grid(rows, self.config, step, accelerator)


def write_validation_grid(rows, config: TrainConfig, step: int, accelerator) -> Path:
    """One row of validation images per step count -> ``OUTPUT/validation/step-NNNNNN.png`` (and TensorBoard)."""
    from .sampling import image_grid

    grid = image_grid(rows, row_labels=[f"{n} steps" for n in config.validation_step_counts], scale=3)
    out = Path(config.output_dir) / "validation"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step-{step:06d}.png"
    grid.save(path)
    if config.report_to == "tensorboard":
        import numpy as np

        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("validation", np.asarray(grid).transpose(2, 0, 1), step)
    return path


class LCDObjective(CachedDataObjective):
    method_name = "latent consistency distillation (LCM-LoRA)"
    student_guidance = 1.0

    def __init__(self, config: TrainConfig, pipe, accelerator):
        super().__init__(config, pipe, accelerator)
        alphas_cumprod = pipe.scheduler.alphas_cumprod.float()
        self.alphas_cumprod = alphas_cumprod.to(self.device)
        self.grid = solvers.DDIMSolverGrid(alphas_cumprod, num_ddim_timesteps=config.num_ddim_timesteps).to(self.device)

    def loss(self, unet, raw_unet, batch_size: int, gen: torch.Generator):
        """One LCD step (LCM Algorithm 1; diffusers' LCM-LoRA recipe), teacher = base UNet, adapter disabled."""
        c = self.config
        latents, cond, uncond = self.batch(batch_size, gen)
        index = self.grid.sample_index(batch_size, gen).to(self.device)
        t_start = self.grid.timesteps(index)
        t_prev = self.grid.prev_timesteps(index)
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        alpha, sigma = parametrization.extract(self.alphas_cumprod, t_start, latents.ndim)
        x_start = alpha * latents + sigma * noise
        w = (c.w_min + (c.w_max - c.w_min) * torch.rand(batch_size, generator=gen)).to(self.device)
        w = parametrization.append_dims(w, latents.ndim)

        student_out = unet(x_start, t_start, **cond).sample
        model_pred = lcd.consistency_output(x_start, student_out.float(), t_start, self.alphas_cumprod,
                                            self.prediction_type, timestep_scaling=c.timestep_scaling_factor)
        with torch.no_grad():
            raw_unet.disable_adapters()
            try:  # conditional and unconditional teacher passes batched into one forward
                teacher_out = unet(torch.cat([x_start, x_start]), torch.cat([t_start, t_start]),
                                   **_concat_cond(cond, uncond)).sample.float()
            finally:
                raw_unet.enable_adapters()
            x_prev = lcd.lcd_target(x_start, teacher_out[:batch_size], teacher_out[batch_size:], w, self.grid,
                                    index, self.prediction_type)
            target_out = unet(x_prev, t_prev, **cond).sample.float()
            target = lcd.consistency_output(x_prev, target_out, t_prev, self.alphas_cumprod, self.prediction_type,
                                            timestep_scaling=c.timestep_scaling_factor)
        loss = lcd.consistency_loss(model_pred, target, c.loss_type, c.huber_c)
        return loss, {}

    def set_student_scheduler(self, pipe):
        from diffusers import LCMScheduler

        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)

    def card(self, config: TrainConfig) -> dict:
        return {"title": "LCM-LoRA (stepdistill)", "method": "lcd", "method_name": self.method_name,
                "base_model": config.pretrained_model, "prediction_type": self.prediction_type,
                "scheduler": "LCMScheduler", "recommended_steps": 4, "recommended_guidance": 1.0,
                "alternative_scheduler": "TCDScheduler", "train_steps": config.max_train_steps,
                "train_batch_size": config.train_batch_size, "lora_rank": config.lora_rank,
                "lora_alpha": config.lora_alpha or config.lora_rank, "learning_rate": config.learning_rate,
                "num_ddim_timesteps": config.num_ddim_timesteps, "w_range": f"[{config.w_min}, {config.w_max}]",
                "loss_type": config.loss_type, "resolution": self.resolution}
