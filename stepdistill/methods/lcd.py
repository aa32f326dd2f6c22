"""Latent consistency distillation (LCM, Luo et al. 2023, Algorithm 1 / eq. 9) with the LoRA variant of LCM-LoRA:
no EMA target network, no guidance embedding; the teacher is the same UNet with the adapter disabled."""
from __future__ import annotations

import torch
from diffusers import LCMScheduler

from .. import lcd, parametrization, solvers
from ..errors import ConfigError
from ..models.family import family_of
from .base import common_card, concat_cond, image_batches, validate_with_pipeline
from .levers import Levers, Teachers


class LCDObjective:
    name = "lcd"
    method_name = "latent consistency distillation (LCM-LoRA)"
    student_guidance = 1.0

    @classmethod
    def check_config(cls, config):
        if config.loss_type not in lcd.LOSS_TYPES:
            raise ConfigError(f"loss_type must be 'l2' or 'huber', got {config.loss_type!r}")
        if not config.w_min <= config.w_max:
            raise ConfigError(f"w_min ({config.w_min}) must not exceed w_max ({config.w_max})")
        if config.validation_couplings_dir:
            raise ConfigError("validation_couplings_dir measures a held-out loss on couplings, for methods trained on "
                              "them (reflow; adversarial with adv_distillation: reflow): drop it here")

    def __init__(self, config, pipe, accelerator):
        if family_of(pipe).is_flow:
            raise ConfigError(f"method='lcd' (latent consistency distillation) is for epsilon / v-prediction UNet "
                              f"teachers; {config.pretrained_model} is a flow-matching {type(pipe).__name__} -- "
                              "use method='reflow' (couplings from `stepdistill reflow couple`) for SD3 / FLUX")
        self.config = config
        self.device = accelerator.device
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.data = image_batches(config, pipe, accelerator)  # the latent cache, or the stream
        self.dataset = self.data.dataset
        self.resolution = self.data.resolution
        alphas_cumprod = pipe.scheduler.alphas_cumprod.float()
        self.alphas_cumprod = alphas_cumprod.to(self.device)
        self.grid = solvers.DDIMSolverGrid(alphas_cumprod, num_ddim_timesteps=config.num_ddim_timesteps).to(self.device)
        self.levers, self.teachers = Levers(config, pipe, accelerator, self.data), Teachers(config, pipe, self.device)

    def loss(self, unet, raw_unet, batch: dict, gen: torch.Generator):
        """One LCD step (LCM Algorithm 1; diffusers' LCM-LoRA recipe) on a batch of the latent cache, teacher = base
        UNet, adapter disabled."""
        c = self.config
        latents = self.data.latents(batch, gen)
        cond, uncond = self.data.conditioning(batch)
        batch_size = len(latents)
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
            # conditional and unconditional teacher passes batched into one forward (the base, adapter disabled,
            # or the weighted `teachers`: methods/levers.py)
            teacher_out = self.teachers(unet, raw_unet, torch.cat([x_start, x_start]), torch.cat([t_start, t_start]),
                                        concat_cond(cond, uncond))
            x_prev = lcd.lcd_target(x_start, teacher_out[:batch_size], teacher_out[batch_size:], w, self.grid,
                                    index, self.prediction_type)
            target_out = unet(x_prev, t_prev, **cond).sample.float()
            target = lcd.consistency_output(x_prev, target_out, t_prev, self.alphas_cumprod, self.prediction_type,
                                            timestep_scaling=c.timestep_scaling_factor)
        loss = lcd.consistency_loss(model_pred, target, c.loss_type, c.huber_c)
        return self.levers.add(loss, {}, unet, raw_unet, batch_size, gen, batch)  # KD levers (0 by default: no-op)

    def set_student_scheduler(self, pipe):
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)

    def validate(self, pipe, accelerator, step: int):
        return validate_with_pipeline(self, pipe, accelerator, step)

    def card(self, config) -> dict:
        return {"title": "LCM-LoRA (stepdistill)", "method": self.name, "method_name": self.method_name,
                "base_model": config.pretrained_model, "prediction_type": self.prediction_type,
                "scheduler": "LCMScheduler", "recommended_steps": 4, "recommended_guidance": 1.0,
                "alternative_scheduler": "TCDScheduler", **common_card(config),
                "num_ddim_timesteps": config.num_ddim_timesteps, "w_range": f"[{config.w_min}, {config.w_max}]",
                "loss_type": config.loss_type, "resolution": self.resolution}
