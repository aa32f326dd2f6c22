"""Adversarial post-training into a LoRA: a distillation term plus LADD's GAN term (Sauer et al. 2024, §3).

Per step, with the student ``G`` = the base UNet with the LoRA, and ``D`` = the frozen teacher (the same UNet,
adapter disabled) tapped at ``disc_layers`` plus small trainable heads (:mod:`.discriminator`)::

    L_G = distill_loss_weight * L_distill + gan_loss_weight * L_gan(D(renoise(G(x_T), t_hat)))
          + dmd_loss_weight * L_dmd(G(x_T))
    L_D = L_disc(D(renoise(x_real, t_hat)), D(renoise(G(x_T).detach(), t_hat))) + disc_r1_weight / 2 * R1

* ``L_distill`` is another method's objective, composed, not copied: the LCD consistency loss
  (:class:`~stepdistill.methods.lcd.LCDObjective`, ``adv_distillation: lcd``) or the reflow velocity regression
  (:class:`~stepdistill.methods.reflow.ReflowObjective`, ``adv_distillation: reflow``, one window).
* ``G(x_T)`` is the student's one-step sample, as its sampler makes it at 1 step: for LCD the consistency
  function at the top timestep of data noised there (ADD's student input), for reflow one Euler step from the
  coupling's start state (``x_0 = x_s - s v``).
* ``x_real``: for LCD the cached data latents, for reflow the couplings' end states (the teacher's own
  samples: LADD trains on synthetic teacher data too). ``t_hat`` is drawn per sample from ``disc_timesteps``.
* ``L_gan`` / ``L_disc``: hinge (ADD/LADD) or non-saturating, R1 on the heads' inputs
  (:mod:`stepdistill.adversarial`).
* ``L_dmd`` (optional, ``dmd_loss_weight``): DMD's distribution-matching term with the guided teacher as the real
  score and a second LoRA as the fake score (:mod:`.dmd`), on the same one-step sample ``G(x_T)``.

The discriminator step runs inside :meth:`AdversarialObjective.loss` with its own optimizer, before the
generator term is formed; its heads and optimizer are checkpointed through :meth:`checkpoint_objects` (never in
the adapter file). With the DMD term the fake score's updates come first in the step, on the same one-step
samples made without gradient, before any forward that builds the student's graph. No gradient reaches the base
weights: they are frozen, and the discriminator passes run with the adapter disabled.
"""
from __future__ import annotations

import math

import torch

from .. import adversarial, lcd
from ..errors import ConfigError
from ..models.denoiser import model_velocity
from ..models.family import family_of
from .base import EmptyPrompt, first_batch
from .discriminator import Discriminator, feature_channels
from .dmd import DistributionMatching
from .features import FeatureTap, adapters_disabled
from .lcd import LCDObjective
from .reflow import ReflowObjective

DISTILLATIONS = {"lcd": LCDObjective, "reflow": ReflowObjective}


class AdversarialObjective:
    name = "adversarial"
    method_name = "LADD-style adversarial post-training (discriminator on the frozen teacher's features)"
    student_guidance = 1.0

    @classmethod
    def check_config(cls, config):
        if config.adv_distillation not in DISTILLATIONS:
            raise ConfigError(f"adv_distillation must be one of {sorted(DISTILLATIONS)}, got {config.adv_distillation!r}")
        DISTILLATIONS[config.adv_distillation].check_config(config)
        if config.gan_loss not in adversarial.GAN_LOSSES:
            raise ConfigError(f"gan_loss must be one of {adversarial.GAN_LOSSES}, got {config.gan_loss!r}")
        for key in ("gan_loss_weight", "distill_loss_weight", "disc_learning_rate", "disc_r1_weight", "dmd_loss_weight",
                    "dmd_fake_learning_rate", "dmd_real_guidance"):
            value = getattr(config, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a finite number >= 0, got {value}")
        if config.distill_loss_weight == 0:
            if config.gan_loss_weight == 0 and config.dmd_loss_weight == 0:
                raise ConfigError("distill_loss_weight=0 with gan_loss_weight=0 and dmd_loss_weight=0 leaves nothing "
                                  "to train: set one of them > 0")
            if config.data_loss_weight or config.feature_loss_weight or config.teachers:
                raise ConfigError("the knowledge-distillation levers (data_loss_weight, feature_loss_weight, "
                                  "teachers) are added to the distillation term: with distill_loss_weight=0 turn "
                                  "them off")
        if not config.disc_layers:
            raise ConfigError("disc_layers must name at least one UNet block, e.g. disc_layers=[mid_block]")
        if not config.disc_timesteps or not all(0 <= t < 1000 for t in config.disc_timesteps):
            raise ConfigError(f"disc_timesteps must be a non-empty list of timesteps in [0, 999], "
                              f"got {config.disc_timesteps}")
        if config.disc_head_channels < 1:
            raise ConfigError(f"disc_head_channels must be >= 1, got {config.disc_head_channels}")
        if config.dmd_loss_weight > 0:
            lo_hi = list(config.dmd_timestep_range)
            if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] < 1000:
                raise ConfigError(f"dmd_timestep_range must be [low, high] with 0 <= low <= high <= 999, got {lo_hi}")
            if config.dmd_fake_updates < 1 or config.dmd_fake_rank < 1:
                raise ConfigError("dmd_fake_updates and dmd_fake_rank must be >= 1")
        if config.adv_distillation == "reflow" and config.reflow_windows != 1:
            raise ConfigError(f"method=adversarial trains a one-step student: with adv_distillation=reflow set "
                              f"reflow_windows=1 (got {config.reflow_windows})")

    def __init__(self, config, pipe, accelerator):
        if family_of(pipe).is_flow:
            raise ConfigError(f"method='adversarial' needs a UNet teacher (SD 1.x/2.x, SDXL); "
                              f"{config.pretrained_model} is a flow-matching {type(pipe).__name__}")
        self.config = config
        self.accelerator = accelerator
        self.device = accelerator.device
        self.kind = config.adv_distillation
        self.distill = DISTILLATIONS[self.kind](config, pipe, accelerator)
        self.dataset = self.distill.dataset  # the distillation's batches feed the GAN term too
        self.heldout = getattr(self.distill, "heldout", None)  # held-out couplings (reflow term): their regression loss
        if getattr(self.distill, "collate", None) is not None:
            self.collate = self.distill.collate
        self.prediction_type = self.distill.prediction_type
        self.resolution = self.distill.resolution
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.float().to(self.device)
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        self.layers = list(config.disc_layers)
        self.disc_timesteps = torch.tensor(config.disc_timesteps, dtype=torch.long)
        first = first_batch(self.dataset, self.device, getattr(self, "collate", None))
        real, _, _, cond = self.gan_batch(first, torch.Generator().manual_seed(0))
        channels = feature_channels(pipe.unet, self.layers, cond, tuple(real.shape[1:]))
        text_dim = cond["encoder_hidden_states"].shape[-1]
        self.disc = Discriminator(channels, text_dim, config.disc_head_channels, config.disc_learning_rate,
                                  self.device, seed=config.seed)
        self.dmd = None  # the DMD term's fake score: a second LoRA on the same UNet (methods/dmd.py)
        if config.dmd_loss_weight > 0:
            self.dmd = DistributionMatching(config, pipe.unet, accelerator, self.alphas_cumprod, self.prediction_type)
            # the real score's guidance needs the empty prompt: the cached / streamed data carry it, couplings not
            self.empty = self.distill.data if self.kind == "lcd" else EmptyPrompt.encoded(pipe, self.device)

    def after_prepare(self):
        """The fake score's optimizer, over the UNet's parameters as ``accelerator.prepare`` left them."""
        if self.dmd is not None:
            self.dmd.build_optimizer()

    def checkpoint_objects(self) -> list:
        """State the training loop checkpoints beside the LoRA (``accelerator.register_for_checkpointing``)."""
        return [self.disc] + ([self.dmd] if self.dmd is not None else [])

    # ------------------------------------------------------------------ batches
    def gan_batch(self, batch: dict, gen: torch.Generator):
        """``(x_real, x_student_input, student_time, cond)`` from a collated batch of the distillation's dataset
        (on the device): the data the discriminator calls real and the input of the student's one-step sample
        (module docstring); noise drawn with ``gen``."""
        if self.kind == "lcd":
            latents = self.distill.data.latents(batch, gen)
            cond, _ = self.distill.data.conditioning(batch)
            t = torch.full((len(latents),), self.num_train_timesteps - 1, dtype=torch.long, device=latents.device)
            noise = torch.randn(latents.shape, generator=gen).to(latents.device)
            return latents, adversarial.renoise(latents, noise, t, self.alphas_cumprod), t, cond
        rows = batch["states"].float()  # a coupling's boundary states: [0] its noise, [-1] the teacher's sample
        s = torch.full((len(rows),), self.distill.sigma_max)
        return rows[:, -1], rows[:, 0], s, batch["cond"]

    def one_step_sample(self, unet, x, time, cond) -> torch.Tensor:
        """The student's clean latent from ``x`` in one step (with gradient into the LoRA)."""
        if self.kind == "lcd":
            out = unet(x, time, **cond).sample.float()
            return lcd.consistency_output(x, out, time, self.alphas_cumprod, self.prediction_type,
                                          timestep_scaling=self.config.timestep_scaling_factor)
        d = self.distill
        v = model_velocity(unet, x, time, cond, prediction_type=d.prediction_type, alphas_cumprod=d.alphas_cumprod,
                           num_train_timesteps=d.num_train_timesteps, flow_family=d.flow_family)
        return adversarial.x0_from_flow(x, v.float(), time.to(x.device))

    def teacher_features(self, raw_unet, x0, noise, t_hat, cond) -> list[torch.Tensor]:
        """The frozen teacher's features at ``renoise(x0, t_hat)`` (adapter disabled; gradient flows to ``x0``
        only, the base weights are frozen)."""
        x = adversarial.renoise(x0, noise, t_hat, self.alphas_cumprod)
        with adapters_disabled(raw_unet), FeatureTap(raw_unet, self.layers) as tap:
            raw_unet(x.to(raw_unet.dtype), t_hat, **cond)
        return [f.float() for f in tap.features]

    # ------------------------------------------------------------------ loss
    def discriminator_step(self, real_feats, fake_feats, t_hat, text) -> dict:
        """One update of the heads on detached features; returns its logs."""
        c, disc = self.config, self.disc
        disc.heads.requires_grad_(True)
        disc.optimizer.zero_grad(set_to_none=True)
        real = [f.detach().requires_grad_(c.disc_r1_weight > 0) for f in real_feats]
        real_logits = disc.logits(real, t_hat, text)
        fake_logits = disc.logits([f.detach() for f in fake_feats], t_hat, text)
        loss = adversarial.discriminator_loss(real_logits, fake_logits, c.gan_loss)
        logs = {"disc_loss": float(loss.detach()), "d_real": float(torch.cat(real_logits, 1).detach().mean()),
                "d_fake": float(torch.cat(fake_logits, 1).detach().mean())}
        if c.disc_r1_weight > 0:
            r1 = adversarial.r1_penalty(real_logits, real)
            loss = loss + c.disc_r1_weight / 2 * r1
            logs["r1"] = float(r1.detach())
        loss.backward()
        if self.accelerator.num_processes > 1:  # the heads are not wrapped by accelerate: average their gradients
            for p in disc.heads.parameters():
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        disc.optimizer.step()
        disc.optimizer.zero_grad(set_to_none=True)
        disc.heads.requires_grad_(False)  # the generator's backward (in the loop) leaves the heads alone
        return logs

    def gan_loss(self, unet, raw_unet, real, x, time, cond: dict, gen: torch.Generator):
        """The generator's GAN term (after one discriminator step), its logs and the student's one-step sample
        (from :meth:`gan_batch`'s ``x`` at ``time``)."""
        batch_size = len(real)
        pick = torch.randint(0, len(self.disc_timesteps), (batch_size,), generator=gen)
        t_hat = self.disc_timesteps[pick].to(self.device)
        noise_real = torch.randn(real.shape, generator=gen).to(self.device)
        noise_fake = torch.randn(real.shape, generator=gen).to(self.device)
        fake = self.one_step_sample(unet, x, time, cond)
        with torch.no_grad():
            real_feats = self.teacher_features(raw_unet, real, noise_real, t_hat, cond)
        fake_feats = self.teacher_features(raw_unet, fake, noise_fake, t_hat, cond)
        text = cond["encoder_hidden_states"]
        logs = self.discriminator_step(real_feats, fake_feats, t_hat, text)
        g = adversarial.generator_loss(self.disc.logits(fake_feats, t_hat, text), self.config.gan_loss)
        return g, {**logs, "gan_g": float(g.detach())}, fake

    def loss(self, unet, raw_unet, batch: dict, gen: torch.Generator):
        """``distill_loss_weight * L_distill + gan_loss_weight * L_gan + dmd_loss_weight * L_dmd`` (module
        docstring); with the last two weights 0 it is the distillation alone (no discriminator or fake-score work),
        with the first 0 the distillation term is not computed."""
        c = self.config
        total, logs, student_input = 0.0, {}, None
        if self.dmd is not None:  # the fake score first, on this step's samples, before any graph of the student
            student_input = self.gan_batch(batch, gen)  # (:meth:`DistributionMatching.update`)
            real, x, time, cond = student_input
            with torch.no_grad():
                current = self.one_step_sample(unet, x, time, cond)
            logs["fake_score_loss"] = self.dmd.update(raw_unet, current, cond, gen)
        if c.distill_loss_weight > 0:  # 0: not computed at all (LADD / DMD2 without regression)
            distill_loss, distill_logs = self.distill.loss(unet, raw_unet, batch, gen)
            logs = {**logs, **distill_logs, "distill": float(distill_loss.detach())}
            total = c.distill_loss_weight * distill_loss
        if c.gan_loss_weight == 0 and self.dmd is None:
            return total, logs
        real, x, time, cond = student_input or self.gan_batch(batch, gen)
        if c.gan_loss_weight > 0:
            g, gan_logs, fake = self.gan_loss(unet, raw_unet, real, x, time, cond, gen)
            total, logs = total + c.gan_loss_weight * g, {**logs, **gan_logs}
        else:
            fake = self.one_step_sample(unet, x, time, cond)
        if self.dmd is not None:  # the same one-step sample, scored by the teacher against the fake score
            d, dmd_logs = self.dmd.loss(raw_unet, fake, cond, self.empty.unconditional(cond), gen)
            total, logs = total + c.dmd_loss_weight * d, {**logs, **dmd_logs}
        return total, logs

    def regression_loss(self, unet, batch: dict, gen: torch.Generator):
        """The reflow term's regression alone (the held-out loss; :meth:`ReflowObjective.regression_loss`)."""
        return self.distill.regression_loss(unet, batch, gen)

    # ------------------------------------------------------------------ sampling and card
    def set_student_scheduler(self, pipe):
        self.distill.set_student_scheduler(pipe)

    def validate(self, pipe, accelerator, step: int):
        return self.distill.validate(pipe, accelerator, step)

    def card(self, config) -> dict:
        """The distillation method's card (its sampler) with the adversarial settings; ``distillation`` names
        the sampler's method for `stepdistill sample` / `eval` (:func:`stepdistill.sampling.sampler_from_lora`)."""
        return {**self.distill.card(config), "title": "Adversarial-LoRA (stepdistill)", "method": self.name,
                "method_name": f"{self.method_name} + {self.kind} distillation", "distillation": self.kind,
                "recommended_steps": 1, "recommended_guidance": self.student_guidance,
                "gan_loss": config.gan_loss, "gan_loss_weight": config.gan_loss_weight,
                "distill_loss_weight": config.distill_loss_weight,
                "disc_layers": ",".join(self.layers), "disc_timesteps": ",".join(map(str, config.disc_timesteps)),
                "disc_r1_weight": config.disc_r1_weight, "disc_learning_rate": config.disc_learning_rate,
                "dmd_loss_weight": config.dmd_loss_weight,
                **({"dmd_real_guidance": config.dmd_real_guidance, "dmd_fake_rank": config.dmd_fake_rank}
                   if config.dmd_loss_weight > 0 else {})}
