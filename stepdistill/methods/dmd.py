"""The distribution-matching term of the adversarial method (DMD, Yin et al. 2024; DMD2, Yin et al. 2024, §3-4):
``dmd_loss_weight > 0`` adds it to the generator's loss.

* **real score**: the frozen teacher (the student's adapter disabled) with classifier-free guidance
  ``dmd_real_guidance`` (DMD2 guides its real score too);
* **fake score**: the same UNet with a second, small LoRA (``fake_score``, rank ``dmd_fake_rank``), initialised
  to zero, so it starts as the teacher; it is trained to denoise the student's current one-step samples (the plain
  denoising loss in the model's own parametrization, ``dmd_fake_updates`` updates per step: DMD2's two time-scale
  rule) with its own AdamW;
* the generator term is :func:`stepdistill.adversarial.distribution_matching_loss` at ``x_t = renoise(x, t)``,
  ``t`` uniform in ``dmd_timestep_range``.

The fake adapter never enters the student's adapter file: the loop's optimizer, checkpoint LoRA and saved file
read the ``default`` adapter only. Its weights and optimizer are checkpointed through this object's
``state_dict`` (``checkpoint_objects``), and with several processes its gradients are averaged by hand (it is
not part of what accelerate wraps), as the discriminator heads' are.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from .. import adversarial, parametrization
from ..lora import add_lora_to_unet
from .base import concat_cond
from .features import adapters_disabled

FAKE_ADAPTER = "fake_score"


@contextlib.contextmanager
def active_adapter(raw_unet, name: str):
    """Run ``raw_unet`` with adapter ``name`` alone (peft also makes only its weights trainable); the previous
    adapters are restored afterwards."""
    previous = raw_unet.active_adapters()
    raw_unet.set_adapter(name)
    try:
        yield
    finally:
        raw_unet.set_adapter(previous)


class DistributionMatching:
    def __init__(self, config, unet, accelerator, alphas_cumprod: torch.Tensor, prediction_type: str):
        self.config, self.accelerator = config, accelerator
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type
        with torch.random.fork_rng(devices=[]):  # the fake LoRA's init leaves the global RNG (the student's) alone
            torch.manual_seed(config.seed + 1)
            add_lora_to_unet(unet, rank=config.dmd_fake_rank, target_modules=config.lora_target_modules,
                             adapter_name=FAKE_ADAPTER)
        self.unet = unet
        self.params = [p for n, p in unet.named_parameters() if f".{FAKE_ADAPTER}." in n]
        for p in self.params:
            p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(self.params, lr=config.dmd_fake_learning_rate, weight_decay=0.0)
        lo, hi = config.dmd_timestep_range
        self.t_range = (int(lo), int(hi))

    # ------------------------------------------------------------------ scores
    def _x0(self, out, x_t, t):
        alpha, sigma = parametrization.extract(self.alphas_cumprod, t, x_t.ndim)
        return parametrization.model_output_to_x0_eps(out.float(), x_t, alpha, sigma, self.prediction_type)[0]

    @torch.no_grad()
    def real_x0(self, raw_unet, x_t, t, cond, uncond):
        """The teacher's guided x0 prediction (adapter disabled)."""
        n = len(x_t)
        with adapters_disabled(raw_unet):
            out = raw_unet(torch.cat([x_t, x_t]).to(raw_unet.dtype), torch.cat([t, t]), **concat_cond(cond, uncond))
        out = out.sample.float()
        guided = out[n:] + self.config.dmd_real_guidance * (out[:n] - out[n:])
        return self._x0(guided, x_t, t)

    @torch.no_grad()
    def fake_x0(self, raw_unet, x_t, t, cond):
        with active_adapter(raw_unet, FAKE_ADAPTER):
            out = raw_unet(x_t.to(raw_unet.dtype), t, **cond).sample
        return self._x0(out, x_t, t)

    def _timesteps(self, n, gen):
        return torch.randint(self.t_range[0], self.t_range[1] + 1, (n,), generator=gen)

    # ------------------------------------------------------------------ updates
    def update_fake(self, raw_unet, x0, cond, gen) -> float:
        """One update of the fake score: denoising loss on the student's samples ``x0`` (detached)."""
        t = torch.randint(0, len(self.alphas_cumprod), (len(x0),), generator=gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        x_t = adversarial.renoise(x0, noise, t, self.alphas_cumprod)
        alpha, sigma = parametrization.extract(self.alphas_cumprod, t, x0.ndim)
        target = parametrization.x0_eps_to_model_output(x0, noise, alpha, sigma, self.prediction_type)
        with active_adapter(raw_unet, FAKE_ADAPTER), torch.enable_grad():
            self.optimizer.zero_grad(set_to_none=True)
            out = raw_unet(x_t.to(raw_unet.dtype), t, **cond).sample.float()
            loss = F.mse_loss(out, target.float())
            loss.backward()
            if self.accelerator.num_processes > 1:
                for p in self.params:
                    if p.grad is not None:
                        p.grad = self.accelerator.reduce(p.grad, reduction="mean")
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def loss(self, raw_unet, x, cond: dict, uncond: dict, gen: torch.Generator):
        """The generator's DMD term at the student's one-step samples ``x`` (with gradient), after
        ``dmd_fake_updates`` fake-score updates on ``x.detach()``; returns ``(loss, logs)``."""
        fake_losses = [self.update_fake(raw_unet, x.detach(), cond, gen) for _ in range(self.config.dmd_fake_updates)]
        t = self._timesteps(len(x), gen).to(x.device)
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        x_t = adversarial.renoise(x.detach(), noise, t, self.alphas_cumprod)
        pred_real = self.real_x0(raw_unet, x_t, t, cond, uncond)
        pred_fake = self.fake_x0(raw_unet, x_t, t, cond)
        loss = adversarial.distribution_matching_loss(x, pred_real, pred_fake)
        return loss, {"dmd": float(loss.detach()), "fake_score_loss": sum(fake_losses) / max(1, len(fake_losses))}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        lora = get_peft_model_state_dict(self.unet, adapter_name=FAKE_ADAPTER)
        return {"lora": {k: v.detach().cpu().clone() for k, v in lora.items()}, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict):
        set_peft_model_state_dict(self.unet, state["lora"], adapter_name=FAKE_ADAPTER)
        self.optimizer.load_state_dict(state["optimizer"])
