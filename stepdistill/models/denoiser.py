"""The denoiser call of each family as a flow velocity (k-diffusion ``external.py`` in spirit).

Everything runs in diffusers' flow convention (see :mod:`stepdistill.parametrization`): flow time ``s``
(1 = noise, 0 = data), flow state ``z = (1 - s) x0 + s eps``, velocity ``v = dz/ds = eps - x0``.

* VP UNets (SD 1.x/2.x, SDXL; ``epsilon`` / ``v_prediction`` / ``sample``) are queried at the VP state
  ``x_t = z / sqrt((1-s)^2 + s^2)`` and the continuous VP timestep ``t(s)``
  (:func:`stepdistill.parametrization.flow_state_to_vp_input`); the output becomes a velocity with
  :func:`stepdistill.parametrization.velocity_from_vp_output`. Classifier-free guidance ``u + w (c - u)`` is
  applied to the native output, as the diffusers pipelines do (it commutes with the affine output->velocity
  map). The ODE starts at ``s = sigma_max = vp_sigma_max(alphas_cumprod)`` (~0.936 for SD, the last training
  timestep) from the VP latent ``x_T = noise``, exactly as a pipeline starts (``init_noise_sigma = 1``).
* FlowMatch transformers predict the velocity directly and start at ``s = 1`` from ``z = noise``:

  - SD3 (``SD3Transformer2DModel``): ``timestep = s * num_train_timesteps``, ``pooled_projections``; CFG as
    ``StableDiffusion3Pipeline`` (the empty prompt as uncond).
  - FLUX.1 (``FluxTransformer2DModel``): ``timestep = s`` (the model scales by 1000 itself), latents packed
    into 2x2 patches (:mod:`stepdistill.models.flux`) with ``img_ids`` / ``txt_ids`` as ``FluxPipeline`` builds
    them. No CFG: ``guidance_scale`` is the *embedded* guidance of models with ``guidance_embeds``
    (FLUX.1-dev-like) and must be 1 for models without it (FLUX.1-schnell-like); ``true_cfg_scale`` is not
    supported here. Latents are kept *unpacked* ``(C, H, W)``; packing happens only at the call.

  The scheduler's ``shift`` (static, or FLUX's ``use_dynamic_shifting``) only places the sampling steps; the
  velocity field does not depend on it (:meth:`TeacherFlow.shift` is used for ``spacing="teacher"`` grids).
"""
from __future__ import annotations

import hashlib
import json
import math

import torch
from diffusers import DDPMScheduler

from .. import parametrization as param
from ..errors import CouplingError
from .family import encode_prompts, family_of, sdxl_time_ids
from .flux import flux_image_ids, pack_flux_latents, unpack_flux_latents
from .latents import latent_shape


def flow_transformer_velocity(model, family: str, z: torch.Tensor, s: torch.Tensor, cond: dict,
                              num_train_timesteps: int = 1000) -> torch.Tensor:
    """The velocity ``noise - x0`` an SD3 / FLUX transformer predicts at flow states ``z`` ``(B, C, H, W)`` and
    per-sample flow times ``s`` ``(B,)``, in ``z``'s layout and dtype.

    ``cond``: model keyword arguments ``encoder_hidden_states``, ``pooled_projections`` and, for FLUX models
    with a guidance embedding, ``guidance`` ``(B,)``."""
    s = s.to(z.device)
    if family == "sd3":
        t = (s.double() * num_train_timesteps).float()
        return model(hidden_states=z, timestep=t, return_dict=False, **cond)[0]
    if family != "flux":
        raise CouplingError(f"unknown flow-matching family {family!r}; one of ('sd3', 'flux')")
    B, _, H, W = z.shape
    enc = cond["encoder_hidden_states"]
    out = model(hidden_states=pack_flux_latents(z), timestep=s.to(z.dtype), guidance=cond.get("guidance"),
                pooled_projections=cond["pooled_projections"], encoder_hidden_states=enc,
                txt_ids=torch.zeros(enc.shape[1], 3, device=z.device, dtype=z.dtype),
                img_ids=flux_image_ids(H, W, z.device, z.dtype), return_dict=False)[0]
    return unpack_flux_latents(out, H, W)


def model_velocity(model, x_s: torch.Tensor, s: torch.Tensor, cond: dict, *, prediction_type: str,
                   alphas_cumprod: torch.Tensor | None = None, num_train_timesteps: int = 1000,
                   flow_family: str = "sd3") -> torch.Tensor:
    """The flow velocity a model (a student with its LoRA, or a teacher) predicts at the flow points
    ``(s, x_s)`` (``s``: per-sample ``(B,)``, CPU), float32, with gradients.

    VP prediction types: UNet at ``flow_state_to_vp_input(x_s, s)``, output -> velocity. ``"flow"``: an SD3 /
    FLUX transformer (``flow_family``) as its pipeline calls it."""
    if prediction_type == "flow":
        return flow_transformer_velocity(model, flow_family, x_s, s, cond, num_train_timesteps).float()
    x_t, t = param.flow_state_to_vp_input(x_s, s, alphas_cumprod)
    out = model(x_t, t.to(x_s.device), **cond).sample
    return param.velocity_from_vp_output(out, x_t, param.vp_abar_of_sigma(s).to(x_s.device), prediction_type)


class TeacherFlow:
    """A diffusers pipeline's denoiser as a guided velocity field ``v(z, s)`` in flow coordinates.

    VP UNet pipelines (SD 1.x/2.x, epsilon / v_prediction / sample; SDXL conditioning) and FlowMatch
    transformer pipelines (SD3 with CFG, FLUX.1 with embedded guidance or none). ``height``/``width`` (pixels)
    fix the latent size, which FLUX's dynamic shift depends on (default: the pipeline's native size)."""

    def __init__(self, pipe, height: int | None = None, width: int | None = None):
        self.pipe = pipe
        config = dict(pipe.scheduler.config)
        family = family_of(pipe)
        self.model_family = family
        self.family = family.name if family.is_flow else None  # the manifests' "flow_family"
        self.is_sdxl = family.name == "sdxl"
        self.guidance_embeds = False
        if not family.is_flow:
            self.kind = "vp"
            self.model = pipe.unet
            self.prediction_type = config.get("prediction_type", "epsilon")
            if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
                raise CouplingError(f"a VP teacher needs prediction_type epsilon/v_prediction/sample in its "
                                    f"scheduler config, got {self.prediction_type!r}; load the teacher's own scheduler")
            ddpm_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
            self.alphas_cumprod = DDPMScheduler(**{k: config[k] for k in ddpm_keys if k in config}).alphas_cumprod
            self.sigma_max = param.vp_sigma_max(self.alphas_cumprod)
        elif "shift" in config:
            self.kind = "flow"
            self.model = pipe.transformer
            self.prediction_type = "flow"
            self.alphas_cumprod = None
            self.sigma_max = 1.0
            self.guidance_embeds = bool(getattr(pipe.transformer.config, "guidance_embeds", False))
        else:
            raise CouplingError(f"{type(pipe).__name__}: a flow-matching transformer needs a FlowMatch scheduler "
                                "(a scheduler config with 'shift')")
        self.scheduler_config = config
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        self.shape = latent_shape(pipe, height, width)

    # -------------------------------------------------------------- description
    @property
    def device(self):
        return self.pipe.device

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def uses_cfg(self) -> bool:
        """Whether ``guidance_scale`` is classifier-free guidance (VP, SD3) rather than FLUX's embedded guidance."""
        return self.family != "flux"

    def check_guidance(self, guidance_scale: float):
        """Refuse guidance a teacher cannot take (FLUX without a guidance embedding has no CFG here)."""
        if self.family == "flux" and not self.guidance_embeds and float(guidance_scale) != 1.0:
            raise CouplingError(
                f"guidance_scale={guidance_scale}: this FLUX model has no guidance embedding (FLUX.1-schnell-like) and "
                "couplings do not support true classifier-free guidance (FluxPipeline's true_cfg_scale); use "
                "guidance_scale=1. For guidance-distilled models (guidance_embeds=True, FLUX.1-dev-like) "
                "guidance_scale is the embedded guidance.")

    def describe(self) -> dict:
        """Architecture identity recorded in (and checked against) a couplings manifest."""
        cfg = self.model.config
        cfg = dict(cfg) if hasattr(cfg, "keys") else dict(vars(cfg))
        model_cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        # only the scheduler settings the ODE depends on (swapping e.g. PNDM for DDIM changes nothing here)
        sched_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                      "prediction_type", "shift", "use_dynamic_shifting")
        if self.scheduler_config.get("use_dynamic_shifting"):
            sched_keys += ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")
        sched = {k: self.scheduler_config.get(k) for k in sched_keys if k in self.scheduler_config}
        blob = json.dumps({"model": model_cfg, "scheduler": sched}, sort_keys=True, default=str)
        out = {"pipeline": type(self.pipe).__name__, "teacher": self.kind, "prediction_type": self.prediction_type,
               "architecture_sha256": hashlib.sha256(blob.encode()).hexdigest()[:16]}
        if self.family == "flux":  # (not for SD3: its couplings made before FLUX support keep their fingerprint)
            out.update(flow_family=self.family, guidance_embeds=self.guidance_embeds)
        return out

    # -------------------------------------------------------------- clocks
    def start_state(self, noise: torch.Tensor) -> torch.Tensor:
        """The flow state at ``sigma_max`` for a pipeline's initial latent ``noise``."""
        noise = noise.float()
        return param.vp_state_to_flow(noise, self.sigma_max) if self.kind == "vp" else noise

    def native_clock(self, s: torch.Tensor) -> torch.Tensor:
        """Flow times -> the teacher's native clock (float64): VP timestep, or the un-shifted FlowMatch sigma."""
        s = torch.as_tensor(s, dtype=torch.float64)
        if self.kind == "vp":
            return param.vp_timestep_for_sigma(s, self.alphas_cumprod).double()
        shift = self.shift()
        return s / (shift - (shift - 1) * s)

    def from_native_clock(self, c: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(c, dtype=torch.float64)
        if self.kind == "vp":
            return param.sigma_for_vp_timestep(c, self.alphas_cumprod).double()
        shift = self.shift()
        return shift * c / (1 + (shift - 1) * c)

    @property
    def clock(self):
        """``(to_native, from_native)`` for :func:`stepdistill.ode.coupling_grid`'s ``spacing="teacher"``."""
        return self.native_clock, self.from_native_clock

    def shift(self) -> float:
        """The FlowMatch shift ``sigma -> shift sigma / (1 + (shift - 1) sigma)`` the teacher samples with at
        ``self.shape``: the static ``shift``, or with ``use_dynamic_shifting`` the pipelines' ``mu`` (diffusers'
        ``calculate_shift`` of the image-token count) as ``exp(mu)`` (``time_shift_type="exponential"``) or ``mu``
        (``"linear"``)."""
        cfg = self.scheduler_config
        if not cfg.get("use_dynamic_shifting"):
            return float(cfg.get("shift", 1.0))
        patch = 2 if self.family == "flux" else int(getattr(self.model.config, "patch_size", 1) or 1)
        tokens = (self.shape[1] // patch) * (self.shape[2] // patch)
        base, top = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        lo, hi = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        mu = tokens * (hi - lo) / (top - base) + lo - (hi - lo) / (top - base) * base  # calculate_shift
        return float(math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu)

    # -------------------------------------------------------------- text
    def encode(self, prompts: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
        """``pipe.encode_prompt`` without guidance, batched; float32 on the CPU."""
        return encode_prompts(self.pipe, prompts, batch_size, family=self.model_family, device=self.device)

    def encode_table(self, prompts: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Embeddings of ``prompts`` plus the unconditional row last (what the pipeline uses for CFG; FLUX
        stores it too, unused, so every couplings directory has the same layout)."""
        emb = self.encode(list(prompts) + [""], batch_size)
        if self.is_sdxl and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            for v in emb.values():
                v[-1].zero_()
        return emb

    def time_ids(self, latent_shape) -> torch.Tensor | None:
        """SDXL's micro-conditioning for an uncropped square start (None for other families)."""
        if not self.is_sdxl:
            return None
        scale = self.pipe.vae_scale_factor
        return sdxl_time_ids(latent_shape[1] * scale, latent_shape[2] * scale)

    # -------------------------------------------------------------- the velocity field
    def _forward(self, x: torch.Tensor, s: float, timestep: torch.Tensor, cond: dict, guidance: float) -> torch.Tensor:
        B = x.shape[0]
        if self.kind == "flow":
            kw = {"encoder_hidden_states": cond["prompt_embeds"], "pooled_projections": cond["pooled"]}
            if self.guidance_embeds:
                kw["guidance"] = torch.full((B,), float(guidance), device=x.device, dtype=torch.float32)
            s_b = torch.full((B,), float(s), dtype=torch.float64)
            return flow_transformer_velocity(self.model, self.family, x, s_b, kw, self.num_train_timesteps)
        kwargs = {}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        return self.model(x, timestep.expand(B), encoder_hidden_states=cond["prompt_embeds"], **kwargs).sample

    @torch.no_grad()
    def velocity(self, z: torch.Tensor, s: float, cond: dict, uncond: dict | None, guidance: float) -> torch.Tensor:
        """The guided flow velocity ``eps - x0`` at the flow point ``(s, z)`` (float32).

        ``cond``/``uncond``: dicts of per-sample tensors (``prompt_embeds``, and ``pooled``/``time_ids`` where the
        model takes them) on the model's device; ``uncond`` may be None when ``guidance == 1`` (and is ignored
        for FLUX, whose ``guidance`` is the embedded guidance)."""
        if self.kind == "vp":
            x, t = param.flow_state_to_vp_input(z.float(), torch.tensor(float(s), dtype=torch.float64),
                                                self.alphas_cumprod)
            timestep = t.reshape(()).float().to(z.device)
        else:
            x = z.float()
            timestep = None
        x_in = x.to(self.dtype)
        if guidance == 1.0 or uncond is None or not self.uses_cfg:
            out = self._forward(x_in, s, timestep, cond, guidance).float()
        else:
            both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            out_u, out_c = self._forward(torch.cat([x_in, x_in]), s, timestep, both, guidance).float().chunk(2)
            out = out_u + guidance * (out_c - out_u)
        if self.kind == "flow":
            return out
        return param.velocity_from_vp_output(out, x.float(), param.vp_abar_of_sigma(s), self.prediction_type)
