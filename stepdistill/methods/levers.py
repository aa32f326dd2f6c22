"""Knowledge-distillation levers, options of every method (equations in :mod:`stepdistill.adversarial` and
docs/methods.md)::

    L = L_method + data_loss_weight * L_data + feature_loss_weight * L_feat

* ``L_data`` (the hard-label term of Hinton et al. 2015's alpha-mix): the plain denoising loss of the student on
  real data latents from the cache, ``E ||f_student(x_t, t, c) - y||^2`` with ``x_t = alpha_t x0 + sigma_t eps``,
  ``t ~ U{0..T-1}`` and ``y`` the model's native target (eps, v or x0).
* ``L_feat`` (FitNets, Romero et al. 2015, eq. 3): the student's and the teacher's (adapter disabled) outputs of
  ``feature_layers`` at that same input, :func:`stepdistill.adversarial.feature_matching_loss`.
* ``teachers`` (several teachers): ``["MODEL@WEIGHT", ...]``; LCD's teacher prediction becomes their weighted
  guided prediction ``sum_i w_i pred_i / sum_i w_i`` (:class:`Teachers`). The guidance combination is linear in
  the raw outputs, so weighting the raw cond/uncond outputs is weighting the guided predictions. The student's own
  base model is named by ``pretrained_model`` (it is the student's network with the adapter disabled: no copy);
  other entries are loaded once, frozen, and must share the base's UNet shapes and prediction type.

Both extra terms draw their own batch of cache rows with the step's generator, so a resumed run replays them.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .. import adversarial, parametrization
from ..errors import ConfigError
from ..models.family import family_of
from ..models.pipeline import load_pipeline
from .base import CachedBatches, StreamedBatches, collate_rows
from .features import FeatureTap, adapters_disabled


def parse_teachers(entries) -> list[tuple[str, float]]:
    """``["MODEL@WEIGHT", "MODEL"]`` -> ``[(MODEL, WEIGHT), (MODEL, 1.0)]`` (the weight is after the last ``@``)."""
    out = []
    for entry in entries:
        model, sep, weight = str(entry).rpartition("@")
        if not sep:
            model, weight = str(entry), "1"
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not model or not (w >= 0 and math.isfinite(w)):
            raise ConfigError(f"teachers entry {entry!r} must be MODEL or MODEL@WEIGHT with a weight >= 0, "
                              "e.g. teachers=[toy@0.5, out/finetune@0.5]")
        out.append((model, w))
    return out


def check_levers(config):
    """The levers' own config checks (one-line :class:`ConfigError` naming the fix)."""
    for key in ("data_loss_weight", "feature_loss_weight"):
        value = getattr(config, key)
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{key} must be a finite number >= 0 (0 turns it off), got {value}")
    if config.feature_loss_weight > 0 and not config.feature_layers:
        raise ConfigError("feature_loss_weight > 0 needs feature_layers, e.g. feature_layers=[mid_block]")
    if config.teachers:
        teachers = parse_teachers(config.teachers)
        if sum(w for _, w in teachers) <= 0:
            raise ConfigError(f"the teachers' weights must sum to a positive number, got {config.teachers}")
        reflow_target = config.method == "reflow" or (config.method == "adversarial"
                                                       and config.adv_distillation == "reflow")
        if reflow_target:
            raise ConfigError("teachers weights LCD's teacher prediction; reflow's targets are fixed in its couplings "
                              "(generate them with the teacher you want): drop teachers or use method=lcd")


class Levers:
    """The data and feature terms of a method's loss (module docstring); inactive (no cache, no work) when both
    weights are 0. ``data``: the method's own :class:`CachedBatches`, if it has one."""

    def __init__(self, config, pipe, accelerator, data: CachedBatches | None = None):
        self.config = config
        self.active = config.data_loss_weight > 0 or config.feature_loss_weight > 0
        if not self.active:
            return
        if family_of(pipe).is_flow:
            raise ConfigError("data_loss_weight / feature_loss_weight need a UNet (SD 1.x/2.x, SDXL) model; "
                              f"{config.pretrained_model} is a flow-matching {type(pipe).__name__}")
        self.device = accelerator.device
        if data is None and config.data_mode == "streaming":
            raise ConfigError(f"data_loss_weight / feature_loss_weight with method={config.method} read real images "
                              "from the latent cache: set data_mode: cached (streaming feeds LCD's own batches)")
        self.data = data if data is not None else CachedBatches(config, pipe, accelerator)
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.float().to(self.device)
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")

    def add(self, loss, logs: dict, unet, raw_unet, batch_size: int, gen: torch.Generator, batch: dict | None = None):
        """``loss + data_loss_weight * L_data + feature_loss_weight * L_feat`` and the logs with both terms. The
        data are ``batch_size`` random rows of the cache or, when the method streams (no random access), the
        method's own ``batch`` again (fresh noise and timesteps)."""
        if not self.active:
            return loss, logs
        c = self.config
        if not isinstance(self.data, StreamedBatches):
            idx = torch.randint(0, len(self.data), (batch_size,), generator=gen)
            batch = collate_rows(self.data, idx, self.device)
        x0 = self.data.latents(batch, gen)
        cond, _ = self.data.conditioning(batch)
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=gen).to(self.device)
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        x_t = adversarial.renoise(x0, noise, t, self.alphas_cumprod)
        feature = c.feature_loss_weight > 0
        tap = FeatureTap(raw_unet, c.feature_layers) if feature else contextlib.nullcontext()
        with tap:
            out = unet(x_t, t, **cond).sample.float()
        logs = dict(logs)
        if c.data_loss_weight > 0:
            alpha, sigma = parametrization.extract(self.alphas_cumprod, t, x0.ndim)
            target = parametrization.x0_eps_to_model_output(x0, noise, alpha, sigma, self.prediction_type)
            data_loss = F.mse_loss(out, target.float())
            loss = loss + c.data_loss_weight * data_loss
            logs["data_loss"] = float(data_loss.detach())
        if feature:
            student = tap.features
            with torch.no_grad(), adapters_disabled(raw_unet), FeatureTap(raw_unet, c.feature_layers) as teacher:
                raw_unet(x_t, t, **cond)
            feat_loss = adversarial.feature_matching_loss(student, teacher.features)
            loss = loss + c.feature_loss_weight * feat_loss
            logs["feature_loss"] = float(feat_loss.detach())
        return loss, logs


class Teachers:
    """The teacher prediction of a method: the base (the student's network, adapter disabled) or, with
    ``config.teachers``, the weighted prediction of several frozen teachers (module docstring)."""

    def __init__(self, config, pipe, device):
        self.members: list[tuple[object | None, float]] = []  # (UNet or None for the base, weight)
        entries = parse_teachers(config.teachers) if config.teachers else [(config.pretrained_model, 1.0)]
        total = sum(w for _, w in entries)
        base = pipe.unet.config
        for model, w in entries:
            if model == config.pretrained_model:
                self.members.append((None, w / total))
                continue
            other = load_pipeline(model, device=str(device), dtype=pipe.unet.dtype)
            unet = other.unet.requires_grad_(False).eval()
            for key in ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "addition_embed_type"):
                if unet.config.get(key) != base.get(key):
                    raise ConfigError(f"teacher {model} has {key}={unet.config.get(key)}, the base "
                                      f"{config.pretrained_model} {base.get(key)}: teachers must share the base's shapes")
            if other.scheduler.config.get("prediction_type", "epsilon") != pipe.scheduler.config.get(
                    "prediction_type", "epsilon"):
                raise ConfigError(f"teacher {model} predicts another target than {config.pretrained_model}")
            self.members.append((unet, w / total))

    @torch.no_grad()
    def __call__(self, unet, raw_unet, x, t, cond: dict) -> torch.Tensor:
        """The weighted raw output of the teachers at ``(x, t, cond)`` (float32)."""
        out = None
        for member, w in self.members:
            if member is None:
                with adapters_disabled(raw_unet):
                    pred = unet(x, t, **cond).sample.float()
            else:
                pred = member(x.to(member.dtype), t, **cond).sample.float()
            out = w * pred if out is None else out + w * pred
        return out
