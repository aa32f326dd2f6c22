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
``state_dict`` (``checkpoint_objects``). Its optimizer is built after ``accelerator.prepare`` (the objective's
``after_prepare``): FSDP2 replaces the UNet's parameters by sharded ones (DTensors) there, and an optimizer
over the old ones would step tensors no forward reads. Under DDP (every process holds the whole adapter, which
accelerate does not wrap) its gradients are averaged by hand, as the discriminator heads' are; under FSDP the
sharded backward has averaged them already, and a checkpoint gathers the shards into whole tensors (every process
calls ``state_dict``; the main one writes it) and scatters them again on resume.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

from .. import adversarial, parametrization
from ..engines import deepspeed_zero_stage
from ..errors import ConfigError
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
        if deepspeed_zero_stage(accelerator) == 3:
            raise ConfigError("dmd_loss_weight > 0 is not supported under DeepSpeed ZeRO-3 (it partitions the fake "
                              "score's LoRA, which trains outside the engine): train under FSDP or DeepSpeed ZeRO-2, "
                              "or set dmd_loss_weight=0")
        self.config, self.accelerator = config, accelerator
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type
        with torch.random.fork_rng(devices=[]):  # the fake LoRA's init leaves the global RNG (the student's) alone
            torch.manual_seed(config.seed + 1)
            add_lora_to_unet(unet, rank=config.dmd_fake_rank, target_modules=config.lora_target_modules,
                             adapter_name=FAKE_ADAPTER)
        self.unet = unet
        for p in self.fake_params().values():
            p.data = p.data.float()
        self._optimizer = None  # built after accelerator.prepare (build_optimizer; module docstring)
        lo, hi = config.dmd_timestep_range
        self.t_range = (int(lo), int(hi))

    def fake_params(self) -> dict:
        """The fake adapter's parameters by name, as the UNet holds them now (sharded ones under FSDP)."""
        return {n: p for n, p in self.unet.named_parameters() if f".{FAKE_ADAPTER}." in n}

    @property
    def params(self) -> list:
        return list(self.optimizer.param_groups[0]["params"])

    def build_optimizer(self):
        """The fake score's AdamW over its parameters as the UNet holds them now. The loop calls this after
        ``accelerator.prepare``, with the model at rest: during a forward FSDP2 holds gathered copies instead."""
        self._optimizer = torch.optim.AdamW(list(self.fake_params().values()),
                                            lr=self.config.dmd_fake_learning_rate, weight_decay=0.0)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:  # used without the loop (one process, nothing sharded)
            self.build_optimizer()
        return self._optimizer

    def sharded(self) -> bool:
        return any(isinstance(p, DTensor) for p in self.params)

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
            if self.accelerator.num_processes > 1 and not self.sharded():  # FSDP averaged the shards' gradients
                for p in self.params:
                    if p.grad is not None:
                        p.grad = self.accelerator.reduce(p.grad, reduction="mean")
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def update(self, raw_unet, x0, cond, gen) -> float:
        """``dmd_fake_updates`` fake-score updates on the student's current one-step samples ``x0`` (no gradient
        to the student); returns their mean loss. The caller runs this before any forward that builds the
        student's graph in the step: a backward through the UNet between the student's forward and its backward
        would, under FSDP, disturb the sharded gradient bookkeeping of that pending backward."""
        losses = [self.update_fake(raw_unet, x0.detach(), cond, gen) for _ in range(self.config.dmd_fake_updates)]
        return sum(losses) / len(losses)

    def loss(self, raw_unet, x, cond: dict, uncond: dict, gen: torch.Generator):
        """The generator's DMD term at the student's one-step samples ``x`` (with gradient), scored by the
        fake score as :meth:`update` left it; returns ``(loss, logs)``."""
        t = self._timesteps(len(x), gen).to(x.device)
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        x_t = adversarial.renoise(x.detach(), noise, t, self.alphas_cumprod)
        pred_real = self.real_x0(raw_unet, x_t, t, cond, uncond)
        pred_fake = self.fake_x0(raw_unet, x_t, t, cond)
        loss = adversarial.distribution_matching_loss(x, pred_real, pred_fake)
        return loss, {"dmd": float(loss.detach())}

    # ------------------------------------------------------------------ checkpoints
    # FSDP (sharded parameters): the weights are gathered into whole tensors and the optimizer state is torch's
    # full optimizer state dict (keyed by parameter name); both calls are collectives, made on every process.
    _FULL = StateDictOptions(full_state_dict=True)

    def state_dict(self) -> dict:
        lora = get_peft_model_state_dict(self.unet, adapter_name=FAKE_ADAPTER)
        lora = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone() for k, v in lora.items()}
        if self.sharded():
            full = get_optimizer_state_dict(self.unet, self.optimizer, options=self._FULL)
            return {"lora": lora, "optimizer_full": full}
        return {"lora": lora, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict):
        lora = state["lora"]
        if self.sharded():  # scatter the whole tensors into this process's shards
            held = {n.replace(f".{FAKE_ADAPTER}", ""): p for n, p in self.fake_params().items()}
            lora = {k: distribute_tensor(v.to(held[k].dtype), held[k].device_mesh, held[k].placements)
                    for k, v in lora.items()}
        set_peft_model_state_dict(self.unet, lora, adapter_name=FAKE_ADAPTER)
        if "optimizer_full" in state:  # torch first builds the empty state (of trainable parameters: the fake's)
            with active_adapter(self.unet, FAKE_ADAPTER):
                set_optimizer_state_dict(self.unet, self.optimizer, state["optimizer_full"], options=self._FULL)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
