"""The reflow objective: regress the student's flow velocity onto straight segments of the teacher's couplings.

* K = 1 (Rectified Flow, Liu et al. 2022, eq. 1; InstaFlow's 2-rectified flow): the straight line from the
  coupling's start state (the noise, at ``s = sigma_max``) to its data (``s = 0``), target velocity
  ``(z_start - z_data) / sigma_max``.
* K > 1 (PeRFlow, Yan et al. 2024): the flow time ``s`` falls in window ``k``, ``(b_{k+1}, b_k]``; the point is
  on the straight segment between the teacher's ODE states at ``b_k`` and ``b_{k+1}`` and the target is that
  segment's velocity (:func:`stepdistill.reflow.piecewise_target`).

The student is the teacher's own network with a LoRA, kept in its native parametrization so that the LoRA
starts as the teacher: for VP (SD) UNets the flow point ``(s, x_s)`` is fed as the VP state
``x_t = x_s / sqrt((1-s)^2 + s^2)`` at the continuous timestep ``t(s)`` (:func:`parametrization.flow_state_to_vp_input`)
and the output (eps / v / x0) is turned into a velocity with :func:`parametrization.velocity_from_vp_output`; a
FlowMatch transformer's (SD3, FLUX.1) output is the velocity already, called as its pipeline calls it
(:func:`stepdistill.models.denoiser.flow_transformer_velocity`: FLUX's packed latents and ids, its ``timestep = s``).
Sampling uses :class:`stepdistill.flow_scheduler.PiecewiseRectifiedFlowScheduler` with the same K windows, whose
Euler step is the inverse of this conversion, at guidance 1 (the teacher's guidance is baked into the couplings).
FLUX is the exception: ``FluxPipeline`` hands its scheduler ``sigmas = linspace(1, 1/N, N)`` and a ``mu``, which
the stock ``FlowMatchEulerDiscreteScheduler`` with ``shift=1, use_dynamic_shifting=False`` takes as given -- a
uniform grid that contains every window boundary when K divides N, i.e. the PeRFlow student's own Euler steps.
A guidance-distilled FLUX teacher (``guidance_embeds``) keeps its embedded guidance: the student is trained, and
must be sampled, with the couplings' ``guidance_scale``.
"""
from __future__ import annotations

import importlib
import math
import warnings

import torch

from .. import adversarial, reflow
from ..data.couplings import load_couplings
from ..errors import ConfigError
from ..models.denoiser import TeacherFlow, model_velocity
from ..models.flux import pack_flux_latents
from ..models.latents import seeded_noise
from .base import common_card, validate_with_pipeline
from .features import FeatureTap, adapters_disabled, submodule
from .levers import Levers

LOSS_WEIGHTINGS = ("velocity", "native")


class ReflowObjective:
    """Rectified-flow / PeRFlow regression on the couplings in ``config.couplings_dir``.

    Unlike LCD it needs no image data: the couplings carry the targets and the text embeddings."""

    name = "reflow"
    student_guidance = 1.0

    @classmethod
    def check_config(cls, config):
        if config.data_mode == "streaming":
            raise ConfigError("data_mode: streaming feeds methods that read images (lcd, adversarial with lcd); "
                              "reflow trains from its couplings, read from disk as it goes: set data_mode: cached")
        if config.reflow_loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"reflow_loss_weighting must be one of {LOSS_WEIGHTINGS}, "
                              f"got {config.reflow_loss_weighting!r}")
        if config.reflow_loss_type not in reflow.REFLOW_LOSS_TYPES:
            raise ConfigError(f"reflow_loss_type must be one of {reflow.REFLOW_LOSS_TYPES}, "
                              f"got {config.reflow_loss_type!r}")
        if config.reflow_huber_c is not None and not config.reflow_huber_c > 0:
            raise ConfigError(f"reflow_huber_c must be > 0 (or unset for iCT's 0.00054 sqrt(d)), "
                              f"got {config.reflow_huber_c}")
        if not (config.perceptual_loss_weight >= 0 and math.isfinite(config.perceptual_loss_weight)):
            raise ConfigError(f"perceptual_loss_weight must be a finite number >= 0, got {config.perceptual_loss_weight}")
        if config.perceptual_loss_weight > 0:
            if config.reflow_windows != 1:
                raise ConfigError("perceptual_loss_weight compares the one-step sample with the coupling's data: it "
                                  f"needs reflow_windows=1 (got {config.reflow_windows})")
            if not config.perceptual_layers:
                raise ConfigError("perceptual_loss_weight > 0 needs perceptual_layers, e.g. [down_blocks.1, mid_block]")
            if not config.perceptual_timesteps or not all(0 <= t < 1000 for t in config.perceptual_timesteps):
                raise ConfigError(f"perceptual_timesteps must be a non-empty list of timesteps in [0, 999], "
                                  f"got {config.perceptual_timesteps}")
        if config.reflow_time_distribution not in ("uniform", "logit_normal", "noise"):
            raise ConfigError(f"reflow_time_distribution must be 'uniform', 'logit_normal' or 'noise', "
                              f"got {config.reflow_time_distribution!r}")

    def __init__(self, config, pipe, accelerator):
        self.config = config
        self.device = accelerator.device
        if not config.couplings_dir:
            raise ConfigError("method=reflow needs couplings_dir: generate couplings with `stepdistill reflow couple "
                              "--model MODEL --out DIR`, then set couplings_dir=DIR")
        teacher = TeacherFlow(pipe)
        self.kind = teacher.kind
        self.flow_family = teacher.family
        self.prediction_type = teacher.prediction_type
        self.alphas_cumprod = teacher.alphas_cumprod
        self.num_train_timesteps = teacher.num_train_timesteps
        self.sigma_max = float(teacher.sigma_max)

        with accelerator.main_process_first():
            self.couplings = self.dataset = load_couplings(config.couplings_dir)
        m = self.couplings.manifest
        where = f"couplings at {config.couplings_dir}"
        self.check_couplings(self.couplings, where, teacher)
        # FLUX-dev: the embedded guidance the couplings were made with is the student's too
        self.student_guidance = float(m["guidance_scale"]) if teacher.guidance_embeds else 1.0
        K, K_c = int(config.reflow_windows), int(m["num_windows"])
        if K < 1 or K_c % K:
            raise ConfigError(f"reflow_windows={K} must divide the couplings' num_windows={K_c} (their boundary "
                              f"states are at {K_c} uniform windows); regenerate couplings with --windows {K}")
        self.num_windows = K
        if config.reflow_time_distribution == "noise" and K != 1:
            raise ConfigError("reflow_time_distribution='noise' (one-step distillation) needs reflow_windows=1: "
                              f"got {K}")
        self.stride = K_c // K
        self.boundaries = self.couplings.sigma_boundaries[::self.stride].float()
        expected = reflow.window_boundaries(K, sigma_max=self.sigma_max)
        if not torch.allclose(self.boundaries, expected, atol=1e-6, rtol=0):
            raise ConfigError(f"{where}: boundaries {self.boundaries.tolist()} differ from the student scheduler's "
                              f"{expected.tolist()}")
        vae_scale = pipe.vae_scale_factor
        self.resolution = int(m["latent_shape"][1]) * vae_scale
        if config.resolution and config.resolution != self.resolution:
            raise ConfigError(f"resolution={config.resolution}, but the couplings are {self.resolution}px latents "
                              f"({m['latent_shape']}); drop resolution or regenerate the couplings")
        self.levers = Levers(config, pipe, accelerator)
        if config.perceptual_loss_weight > 0:
            if self.kind != "vp":
                raise ConfigError(f"perceptual_loss_weight needs a UNet teacher (SD 1.x/2.x, SDXL), whose features "
                                  f"measure it; {config.pretrained_model} is a flow-matching model")
            for name in config.perceptual_layers:
                submodule(pipe.unet, name)  # a misspelt layer: a one-line error now, not at the first step
            self.perceptual_timesteps = torch.tensor(config.perceptual_timesteps, dtype=torch.long)
        self.heldout = None  # couplings the run never trains on: their loss is logged (training/heldout.py)
        if config.validation_couplings_dir:
            with accelerator.main_process_first():
                self.heldout = load_couplings(config.validation_couplings_dir)
            self.check_couplings(self.heldout, f"validation couplings at {config.validation_couplings_dir}", teacher)
            h = self.heldout.manifest
            if (int(h["num_windows"]) != K_c or h["latent_shape"] != m["latent_shape"]
                    or float(h["guidance_scale"]) != float(m["guidance_scale"])):
                raise ConfigError(f"validation_couplings_dir={config.validation_couplings_dir} was made with other "
                                  "windows, latent size or guidance than couplings_dir: generate it with the same "
                                  "`stepdistill reflow couple` settings and another --seed / --prompts")

    def check_couplings(self, couplings, where: str, teacher):
        """Refuse couplings that another teacher (kind, prediction type, family, guidance embedding, schedule) made;
        warn when they name another model."""
        m, config = couplings.manifest, self.config
        if m["teacher"] != self.kind or m["prediction_type"] != self.prediction_type:
            raise ConfigError(f"{where} come from a {m['teacher']}/{m['prediction_type']} teacher, but "
                              f"{config.pretrained_model} is {self.kind}/{self.prediction_type}")
        if couplings.flow_family != self.flow_family:
            raise ConfigError(f"{where} come from a {couplings.flow_family} teacher, but "
                              f"{config.pretrained_model} is a {self.flow_family} model")
        if bool(m.get("guidance_embeds")) != teacher.guidance_embeds:
            raise ConfigError(f"{where}: the teacher {'had' if m.get('guidance_embeds') else 'had no'} guidance "
                              f"embedding, {config.pretrained_model} "
                              f"{'has' if teacher.guidance_embeds else 'has none'}")
        if abs(float(m["sigma_max"]) - self.sigma_max) > 1e-5:
            raise ConfigError(f"{where} start at flow time {m['sigma_max']:.6f}, this model's schedule at "
                              f"{self.sigma_max:.6f}: they were generated with another noise schedule")
        if m.get("model") and m["model"] != config.pretrained_model:
            warnings.warn(f"{where} were generated with model {m['model']!r}, training on "
                          f"{config.pretrained_model!r}; reflow assumes the student's base is the coupling teacher",
                          UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ loss
    def targets(self, batch: dict, gen: torch.Generator):
        """Regression targets for a collated batch of coupling rows: ``s, x_s, v_target`` (flow times drawn with
        ``gen``; on the batch's device)."""
        rows = batch["states"].float()
        batch_size = len(rows)
        s = reflow.sample_flow_times(batch_size, gen, self.config.reflow_time_distribution, sigma_max=self.sigma_max)
        k = reflow.window_of(s, self.boundaries) if self.num_windows > 1 else torch.zeros(batch_size, dtype=torch.long)
        ar = torch.arange(batch_size)
        z_start, z_end = rows[ar, k * self.stride], rows[ar, (k + 1) * self.stride]
        dev = rows.device
        x_s, v_target = reflow.piecewise_target(z_start, z_end, self.boundaries[k].to(dev),
                                                self.boundaries[k + 1].to(dev), s.to(dev))
        return s, x_s, v_target

    def loss(self, unet, raw_unet, batch: dict, gen: torch.Generator):
        """The distance (``reflow_loss_type``: MSE or pseudo-Huber) between the student's velocity and the
        (piecewise) straight coupling velocity, the optional perceptual term, and the KD levers."""
        loss, s, (x_s, v_pred, v_target) = self.regression_loss(unet, batch, gen, parts=True)
        logs = {"s_mean": float(s.mean())}
        if self.config.perceptual_loss_weight > 0:
            p = self.perceptual_loss(raw_unet, adversarial.x0_from_flow(x_s, v_pred, s.to(self.device)),
                                     adversarial.x0_from_flow(x_s, v_target, s.to(self.device)), batch["cond"], gen)
            logs = {**logs, "regression": float(loss.detach()), "perceptual": float(p.detach())}
            loss = loss + self.config.perceptual_loss_weight * p
        # KD levers (0 by default: no-op; their data are the cached real images of train_data)
        return self.levers.add(loss, logs, unet, raw_unet, len(s), gen)

    def perceptual_loss(self, raw_unet, x0_pred, x0_target, cond: dict, gen: torch.Generator) -> torch.Tensor:
        """LPIPS's distance (:func:`stepdistill.adversarial.perceptual_distance`) between the frozen teacher's
        features at ``perceptual_layers`` of the two clean latents, renoised with the same noise to a timestep drawn
        per sample from ``perceptual_timesteps``; the gradient reaches ``x0_pred`` only."""
        pick = torch.randint(0, len(self.perceptual_timesteps), (len(x0_pred),), generator=gen)
        t = self.perceptual_timesteps[pick].to(self.device)
        noise = torch.randn(x0_pred.shape, generator=gen).to(self.device)
        layers, ac = self.config.perceptual_layers, self.alphas_cumprod.to(self.device)
        with adapters_disabled(raw_unet):
            with torch.no_grad(), FeatureTap(raw_unet, layers) as tap:
                raw_unet(adversarial.renoise(x0_target.float(), noise, t, ac).to(raw_unet.dtype), t, **cond)
                target = [f.float() for f in tap.features]
            with FeatureTap(raw_unet, layers) as tap:
                raw_unet(adversarial.renoise(x0_pred.float(), noise, t, ac).to(raw_unet.dtype), t, **cond)
                pred = tap.features
        return adversarial.perceptual_distance(pred, target)

    def regression_loss(self, unet, batch: dict, gen: torch.Generator, parts: bool = False):
        """``(loss, s)``: the regression term alone on ``batch`` (what :meth:`loss` trains and the held-out loss
        measures); with ``parts`` also ``(x_s, v_pred, v_target)`` on the device."""
        s, x_s, v_target = self.targets(batch, gen)
        v_pred = model_velocity(unet, x_s.to(self.device), s, batch["cond"], prediction_type=self.prediction_type,
                                alphas_cumprod=self.alphas_cumprod, num_train_timesteps=self.num_train_timesteps,
                                flow_family=self.flow_family)
        weighting = None
        if self.config.reflow_loss_weighting == "native":
            weighting = reflow.native_loss_weight(s, self.prediction_type).to(self.device)
        v_target = v_target.to(self.device)
        loss = reflow.reflow_loss(v_pred, v_target, weighting, self.config.reflow_loss_type, self.config.reflow_huber_c)
        return (loss, s, (x_s.to(self.device), v_pred, v_target)) if parts else (loss, s)

    # ------------------------------------------------------------------ sampling and card
    def scheduler_spec(self) -> tuple[str, str, dict]:
        """``(module, class, from_config kwargs)`` of the student's sampler (see the module docstring)."""
        if self.flow_family == "flux":
            return "diffusers", "FlowMatchEulerDiscreteScheduler", {"shift": 1.0, "use_dynamic_shifting": False}
        return ("stepdistill.flow_scheduler", "PiecewiseRectifiedFlowScheduler",
                {"num_windows": self.num_windows, "prediction_type": self.prediction_type})

    def set_student_scheduler(self, pipe):
        module, name, kwargs = self.scheduler_spec()
        cls = getattr(importlib.import_module(module), name)
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)

    @torch.no_grad()
    def validate(self, pipe, accelerator, step: int):
        """The shared validation grid; FLUX pipelines get packed latents from the couplings' noise convention
        (``sampling.generate`` draws SD-shaped latents)."""
        if self.flow_family != "flux":
            return validate_with_pipeline(self, pipe, accelerator, step)
        prompts = list(self.config.validation_prompts)
        shape = tuple(self.couplings.manifest["latent_shape"])
        latents = pack_flux_latents(seeded_noise(range(len(prompts)), 0, shape))
        latents = latents.to(pipe.device, pipe.transformer.dtype)

        def sample(prompts, steps):
            images = pipe(prompts, latents=latents, num_inference_steps=steps, guidance_scale=self.student_guidance,
                          height=self.resolution, width=self.resolution, output_type="np").images
            return (images.clip(0, 1) * 255).round().astype("uint8")

        return validate_with_pipeline(self, pipe, accelerator, step, sample)

    def card(self, config) -> dict:
        m = self.couplings.manifest
        K = self.num_windows
        name = ("rectified flow (reflow, InstaFlow-style) on teacher couplings" if K == 1
                else f"piecewise rectified flow (PeRFlow-style, {K} windows) on teacher couplings")
        module, scheduler, kwargs = self.scheduler_spec()
        return {"title": f"{'Reflow' if K == 1 else 'PeRFlow'}-LoRA (stepdistill)", "method": "reflow",
                "method_name": name, "base_model": config.pretrained_model, "prediction_type": self.prediction_type,
                "scheduler": scheduler, "scheduler_module": module,
                "scheduler_kwargs": kwargs, "num_windows": K, "sigma_max": self.sigma_max,
                "recommended_steps": K, "steps_multiple_of": K, "recommended_guidance": self.student_guidance,
                "coupling_teacher": m.get("model", ""), "coupling_solver": m["solver"],
                "coupling_steps": m["num_steps"], "coupling_guidance": m["guidance_scale"],
                "num_couplings": m["num_couplings"], "time_distribution": config.reflow_time_distribution,
                "loss_weighting": config.reflow_loss_weighting, "loss_type": config.reflow_loss_type,
                **({"perceptual_loss_weight": config.perceptual_loss_weight,
                    "perceptual_layers": ",".join(config.perceptual_layers),
                    "perceptual_timesteps": ",".join(map(str, config.perceptual_timesteps)),
                   } if config.perceptual_loss_weight > 0 else {}),
                **common_card(config),
                "resolution": self.resolution}
