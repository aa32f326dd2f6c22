"""Teacher couplings for reflow: (noise, data) pairs and the window-boundary states of the teacher's guided
probability-flow ODE, generated once, stored in resumable safetensors shards, read by the reflow objective.

What is solved
--------------
Everything runs in diffusers' flow convention (see :mod:`stepdistill.reflow`): flow time ``s`` (1 = noise,
0 = data), flow state ``z = (1 - s) x0 + s eps``, velocity ``v = dz/ds = eps - x0``.

* VP teachers (SD-family UNets, ``epsilon`` / ``v_prediction`` / ``sample``): the UNet is queried at the VP
  state ``x_t = z / sqrt((1-s)^2 + s^2)`` and the continuous VP timestep ``t(s)``
  (:func:`stepdistill.reflow.flow_state_to_vp_input`); its guided output is turned into a velocity with
  :func:`stepdistill.reflow.velocity_from_vp_output`. Classifier-free guidance ``u + w (c - u)`` is applied to
  the native output exactly as the diffusers pipelines do (it commutes with the affine output->velocity map).
  The ODE starts at ``s = sigma_max = vp_sigma_max(alphas_cumprod)`` (~0.936 for SD, the last training
  timestep) from the VP latent ``x_T = noise ~ N(0, I)``, exactly as a diffusers pipeline starts
  (``init_noise_sigma = 1``); its flow state there is ``z = sqrt((1-s_max)^2 + s_max^2) * noise``.
* Flow-matching teachers (a ``transformer`` with a ``FlowMatchEulerDiscreteScheduler``): the transformer
  predicts the velocity directly; the ODE starts at ``s = 1`` from ``z = noise``
  (:func:`flow_transformer_velocity` holds the calling conventions of both families):

  - SD3 (``SD3Transformer2DModel``): ``timestep = s * num_train_timesteps``, ``pooled_projections``;
    classifier-free guidance as ``StableDiffusion3Pipeline`` (``guidance_scale``, the empty prompt as uncond).
  - FLUX.1 (``FluxTransformer2DModel``): ``timestep = s`` (the model scales by 1000 itself), latents packed
    into 2x2 patches (``(B, H/2 * W/2, 4C)`` tokens, :func:`pack_flux_latents` = ``FluxPipeline._pack_latents``)
    with ``img_ids`` / ``txt_ids`` as ``FluxPipeline`` builds them. There is no CFG: ``guidance_scale`` is the
    *embedded* distilled guidance for models with ``guidance_embeds`` (FLUX.1-dev-like; stored, and fed to the
    student in training) and must be 1 for models without it (FLUX.1-schnell-like). ``FluxPipeline``'s true CFG
    (``true_cfg_scale`` with a negative prompt) is not supported for couplings. All stored latents (noise,
    data, boundary states) are *unpacked* ``(C, H, W)``, the VAE's layout and the shape ``FluxPipeline``
    draws its noise in; packing happens only at the transformer call.

  The scheduler's ``shift`` (static, or FLUX's resolution-dependent ``use_dynamic_shifting`` with
  ``mu = calculate_shift(image_seq_len)``, ``image_seq_len`` = the number of image tokens) only places the
  sampling steps; the velocity field ``v(z, s)`` does not depend on it. So the couplings depend on it only
  through ``spacing="teacher"``.

Step grid and exact boundary states
-----------------------------------
The K windows are ``reflow.window_boundaries(K, sigma_max)`` (equal to the student scheduler's
``PiecewiseRectifiedFlowScheduler.window_sigmas``). The ODE is integrated on a grid that contains every window
boundary as a step point (``num_steps >= K``; window k gets ``num_steps // K`` steps, the first
``num_steps % K`` windows one more, as ``PiecewiseRectifiedFlowScheduler.window_aligned_sigmas``), so the
recorded boundary states are the solver's own states at exactly those flow times: no interpolation. Inside a
window the steps are uniform in ``s`` (``spacing="sigma"``, the student scheduler's grid) or in the teacher's
native clock (``spacing="teacher"``: the VP timestep, or the shifted sigma of a FlowMatch scheduler, with the
dynamic shift ``exp(mu)`` -- ``mu`` for ``time_shift_type="linear"`` -- at the couplings' resolution).

Solvers (all on that grid, one guided model evaluation per step):

* ``"ddim"``: Euler in flow coordinates, ``z' = z + (s' - s) v``; for VP teachers this is exactly DDIM
  (eta = 0) between ``t(s)`` and ``t(s')``, and identical to what a ``StableDiffusionPipeline`` with
  ``PiecewiseRectifiedFlowScheduler`` computes; for flow teachers it is ``FlowMatchEulerDiscreteScheduler``.
* ``"euler"``: Euler in the teacher's native sampler space: for VP teachers the Karras/EDM ODE of diffusers'
  ``EulerDiscreteScheduler`` (``x/alpha`` against ``sigma/alpha``); for flow teachers the same as ``"ddim"``.
* ``"dpmpp"``: DPM-Solver++(2M) (Lu et al. 2022), data prediction, half-log-SNR ``lambda = log((1-s)/s)``,
  first order on the first and the last step (``lower_order_final``).

Storage (``out_dir``)
---------------------
* ``manifest.json``: the arguments (checked on every rerun), the prompts table, the window boundaries and the
  full step grid, the shard list and the completed shards, the conventions in words.
* ``embeddings.safetensors``: ``prompt_embeds`` per distinct prompt (first-appearance order) and the
  unconditional embedding as the last row (the empty prompt, or zeros where the pipeline uses zeros:
  SDXL's ``force_zeros_for_empty_prompt``); ``pooled`` for SDXL/SD3/FLUX. Computed with ``pipe.encode_prompt``
  (the pipeline's default ``max_sequence_length``), so training never runs a text encoder.
* ``couplings-NNNNN.safetensors`` (``shard_size`` couplings each), per coupling ``i``:

  - ``noise`` ``(C, H, W)``: the Gaussian draw ``torch.randn(generator=torch.Generator().manual_seed(seed + i))``
    (the ``latents`` a diffusers pipeline would start from -- for ``FluxPipeline`` after
    :func:`pack_flux_latents`; also :func:`stepdistill.sampling.generate`'s noise for image ``i``);
  - ``data`` ``(C, H, W)``: the ODE's endpoint at ``s = 0``, a clean latent as the UNet/VAE sees it (scaled by
    the VAE's ``scaling_factor``);
  - ``boundary_states`` ``(K + 1, C, H, W)``: the flow states ``z`` at ``sigma_boundaries[0..K]``; entry 0 is
    the start state (``n(sigma_max) * noise`` for VP, ``noise`` for flow teachers), entry K equals ``data``;
  - ``prompt_index`` (row of ``embeddings.safetensors``), ``seed`` (``seed + i``), ``guidance``, ``index``
    (``i``).

Every file is written to a temporary name and renamed into place. A run interrupted at any point resumes
with the same arguments, skipping finished shards; a manifest holding different arguments raises
:class:`CouplingArgumentsMismatch`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import reflow

COUPLINGS_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.safetensors"
SOLVERS = ("ddim", "euler", "dpmpp")
SPACINGS = ("sigma", "teacher")
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = [
    "CouplingError",
    "CouplingArgumentsMismatch",
    "CouplingInterrupted",
    "CouplingRunResult",
    "CouplingSet",
    "TeacherFlow",
    "flow_family_of",
    "flow_transformer_velocity",
    "pack_flux_latents",
    "unpack_flux_latents",
    "coupling_grid",
    "solve_teacher_ode",
    "generate_couplings",
    "load_couplings",
    "coupling_solver_error",
    "read_prompts",
    "add_reflow_commands",
]


class CouplingError(ValueError):
    """The couplings directory cannot be used as asked; the message says what to do."""


class CouplingArgumentsMismatch(CouplingError):
    """``out_dir`` holds couplings generated with different arguments."""


class CouplingInterrupted(RuntimeError):
    """Raised by the ``stop_after_shards`` test hook to simulate a crash."""


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None):
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_write_json(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# the teacher's guided probability-flow ODE in flow coordinates


FLOW_FAMILIES = ("sd3", "flux")


def flow_family_of(model) -> str | None:
    """``"sd3"`` / ``"flux"`` for diffusers' SD3 / FLUX.1 transformers (by class, peft-wrapped or not), else None."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    model = getattr(model, "module", model)  # DistributedDataParallel
    if isinstance(model, FluxTransformer2DModel):
        return "flux"
    if isinstance(model, SD3Transformer2DModel):
        return "sd3"
    return None


def pack_flux_latents(z: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``: FLUX's 2x2 patch tokens (``FluxPipeline._pack_latents``)."""
    B, C, H, W = z.shape
    if H % 2 or W % 2:
        raise CouplingError(f"FLUX latents need even height and width, got {H}x{W}")
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_flux_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_flux_latents` for latent ``height`` x ``width``."""
    B, _, D = x.shape
    return x.view(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, height, width)


def flux_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``img_ids`` of a ``height`` x ``width`` latent (``FluxPipeline._prepare_latent_image_ids`` at H/2, W/2)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flow_transformer_velocity(model, family: str, z: torch.Tensor, s: torch.Tensor, cond: dict,
                              num_train_timesteps: int = 1000) -> torch.Tensor:
    """The velocity ``noise - x0`` an SD3 / FLUX transformer predicts at flow states ``z`` ``(B, C, H, W)`` and
    per-sample flow times ``s`` ``(B,)``, in ``z``'s layout and dtype.

    ``cond``: model keyword arguments ``encoder_hidden_states``, ``pooled_projections`` and, for FLUX models
    with a guidance embedding, ``guidance`` ``(B,)``. SD3 is called as ``StableDiffusion3Pipeline`` calls it
    (``timestep = s * num_train_timesteps``); FLUX as ``FluxPipeline`` does (packed latents, ``img_ids``,
    zero ``txt_ids``, ``timestep = s``)."""
    s = s.to(z.device)
    if family == "sd3":
        t = (s.double() * num_train_timesteps).float()
        return model(hidden_states=z, timestep=t, return_dict=False, **cond)[0]
    if family != "flux":
        raise CouplingError(f"unknown flow-matching family {family!r}; one of {FLOW_FAMILIES}")
    B, _, H, W = z.shape
    enc = cond["encoder_hidden_states"]
    out = model(hidden_states=pack_flux_latents(z), timestep=s.to(z.dtype), guidance=cond.get("guidance"),
                pooled_projections=cond["pooled_projections"], encoder_hidden_states=enc,
                txt_ids=torch.zeros(enc.shape[1], 3, device=z.device, dtype=z.dtype),
                img_ids=flux_image_ids(H, W, z.device, z.dtype), return_dict=False)[0]
    return unpack_flux_latents(out, H, W)


class TeacherFlow:
    """A diffusers pipeline's denoiser as a guided velocity field ``v(z, s)`` in flow coordinates.

    Supports VP UNet pipelines (SD 1.x/2.x, epsilon / v_prediction / sample; SDXL conditioning) and FlowMatch
    transformer pipelines: SD3 (``StableDiffusion3Pipeline``, CFG) and FLUX.1 (``FluxPipeline``, embedded
    guidance or none; see the module docstring). ``height``/``width`` (pixels) fix the latent size, which FLUX's
    dynamic shift depends on (default: the pipeline's native size)."""

    def __init__(self, pipe, height: int | None = None, width: int | None = None):
        self.pipe = pipe
        config = dict(pipe.scheduler.config)
        self.family = None
        self.guidance_embeds = False
        if getattr(pipe, "unet", None) is not None:
            from diffusers import DDPMScheduler

            self.kind = "vp"
            self.model = pipe.unet
            self.prediction_type = config.get("prediction_type", "epsilon")
            if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
                raise CouplingError(f"a VP teacher needs prediction_type epsilon/v_prediction/sample in its "
                                    f"scheduler config, got {self.prediction_type!r}; load the teacher's own scheduler")
            ddpm_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
            self.alphas_cumprod = DDPMScheduler(**{k: config[k] for k in ddpm_keys if k in config}).alphas_cumprod
            self.sigma_max = reflow.vp_sigma_max(self.alphas_cumprod)
            self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None and \
                getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"
        elif getattr(pipe, "transformer", None) is not None and "shift" in config:
            self.family = flow_family_of(pipe.transformer)
            if self.family is None and hasattr(pipe, "text_encoder_3"):
                self.family = "sd3"  # an SD3-style pipeline around another transformer class: SD3's call convention
            if self.family is None:
                raise CouplingError(f"{type(pipe).__name__} ({type(pipe.transformer).__name__}): only SD3 "
                                    "(SD3Transformer2DModel) and FLUX.1 (FluxTransformer2DModel) flow-matching "
                                    "transformers are supported")
            self.kind = "flow"
            self.model = pipe.transformer
            self.prediction_type = "flow"
            self.alphas_cumprod = None
            self.sigma_max = 1.0
            self.is_sdxl = False
            self.guidance_embeds = bool(getattr(pipe.transformer.config, "guidance_embeds", False))
        else:
            raise CouplingError(f"{type(pipe).__name__} is neither a UNet (VP) pipeline nor a FlowMatch (SD3 / "
                                "FLUX.1) transformer pipeline")
        self.scheduler_config = config
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        self.shape = self.latent_shape(height, width)

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

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """``(C, H, W)`` of the (unpacked) latents for an image of ``height`` x ``width`` pixels."""
        cfg = self.model.config
        scale = self.pipe.vae_scale_factor
        if self.family == "flux":  # no sample_size; in_channels counts packed 2x2 patches
            default = self.pipe.default_sample_size * scale
            height, width = height or default, width or default
            if height % (2 * scale) or width % (2 * scale):
                raise CouplingError(f"FLUX needs height and width divisible by {2 * scale} (VAE factor x 2x2 "
                                    f"packing), got {height}x{width}")
            return (int(cfg.in_channels) // 4, int(height) // scale, int(width) // scale)
        h = (height or cfg.sample_size * scale) // scale
        w = (width or cfg.sample_size * scale) // scale
        return (int(cfg.in_channels), int(h), int(w))

    def check_guidance(self, guidance_scale: float):
        """Refuse guidance a teacher cannot take (FLUX without a guidance embedding has no CFG here)."""
        if self.family == "flux" and not self.guidance_embeds and float(guidance_scale) != 1.0:
            raise CouplingError(
                f"guidance_scale={guidance_scale}: this FLUX model has no guidance embedding (FLUX.1-schnell-like) and "
                "couplings do not support true classifier-free guidance (FluxPipeline's true_cfg_scale); use "
                "guidance_scale=1. For guidance-distilled models (guidance_embeds=True, FLUX.1-dev-like) "
                "guidance_scale is the embedded guidance.")

    def describe(self) -> dict:
        """Architecture identity recorded in (and checked against) the manifest."""
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
        return reflow.vp_state_to_flow(noise, self.sigma_max) if self.kind == "vp" else noise

    def native_clock(self, s: torch.Tensor) -> torch.Tensor:
        """Flow times -> the teacher's native clock (float64): VP timestep, or the un-shifted FlowMatch sigma."""
        s = torch.as_tensor(s, dtype=torch.float64)
        if self.kind == "vp":
            return reflow.vp_timestep_for_sigma(s, self.alphas_cumprod).double()
        shift = self.shift()
        return s / (shift - (shift - 1) * s)

    def from_native_clock(self, c: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(c, dtype=torch.float64)
        if self.kind == "vp":
            return reflow.sigma_for_vp_timestep(c, self.alphas_cumprod).double()
        shift = self.shift()
        return shift * c / (1 + (shift - 1) * c)

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
        from .precompute import encode_captions

        family = self.family if self.kind == "flow" else ("sdxl" if self.is_sdxl else "sd")
        return encode_captions(self.pipe, prompts, batch_size, family=family, device=self.device)

    def encode_table(self, prompts: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Embeddings of ``prompts`` plus the unconditional row last (what the pipeline uses for CFG; FLUX
        stores it too, unused, so every couplings directory has the same layout)."""
        emb = self.encode(list(prompts) + [""], batch_size)
        if self.is_sdxl and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            for v in emb.values():
                v[-1].zero_()
        return emb

    def time_ids(self, latent_shape) -> torch.Tensor | None:
        """SDXL's micro-conditioning (original size, crop top-left, target size) for an uncropped square start."""
        if not self.is_sdxl:
            return None
        h, w = latent_shape[1] * self.pipe.vae_scale_factor, latent_shape[2] * self.pipe.vae_scale_factor
        return torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)

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
            x, t = reflow.flow_state_to_vp_input(z.float(), torch.tensor(float(s), dtype=torch.float64),
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
        abar = (1 - s) ** 2 / ((1 - s) ** 2 + s**2)  # alpha(s)^2, the exact VP pair of s (stepdistill.reflow)
        return reflow.velocity_from_vp_output(out, x.float(), abar, self.prediction_type)


# ----------------------------------------------------------------------------------------------------
# grid and solvers


def coupling_grid(num_steps: int, num_windows: int, sigma_max: float, spacing: str = "sigma",
                  teacher: TeacherFlow | None = None) -> tuple[torch.Tensor, list[int]]:
    """The ``num_steps + 1`` flow times (float64, ``sigma_max`` ... 0) and the grid indices of the ``K + 1``
    window boundaries. Window k gets ``num_steps // K`` steps (+1 for the first ``num_steps % K`` windows); with
    ``spacing="sigma"`` this is ``PiecewiseRectifiedFlowScheduler.window_aligned_sigmas(num_steps)``."""
    N, K = int(num_steps), int(num_windows)
    if K < 1:
        raise CouplingError(f"num_windows must be >= 1, got {K}")
    if N < K:
        raise CouplingError(f"num_steps ({N}) must be >= num_windows ({K}): every window boundary must be a step "
                            "point for its state to be exact")
    if spacing not in SPACINGS:
        raise CouplingError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    b = torch.linspace(float(sigma_max), 0.0, K + 1, dtype=torch.float64)
    q, r = divmod(N, K)
    pts, idx = [], [0]
    for k in range(K):
        n_k = q + 1 if k < r else q
        if spacing == "sigma" or teacher is None:
            seg = torch.linspace(float(b[k]), float(b[k + 1]), n_k + 1, dtype=torch.float64)
        else:
            c0, c1 = teacher.native_clock(b[k:k + 1]), teacher.native_clock(b[k + 1:k + 2])
            seg = teacher.from_native_clock(torch.linspace(float(c0), float(c1), n_k + 1, dtype=torch.float64))
            seg[0], seg[-1] = b[k], b[k + 1]  # the boundaries themselves stay exact
        pts.append(seg[:-1])
        idx.append(idx[-1] + n_k)
    pts.append(b[-1:])
    grid = torch.cat(pts)
    if torch.any(grid[1:] >= grid[:-1]):
        raise CouplingError("the step grid is not strictly decreasing")
    return grid, idx


def _lam(s: float) -> float:
    """DPM-Solver's half log-SNR ``log(alpha/sigma) = log((1-s)/s)`` (-inf at s=1, +inf at s=0)."""
    if s <= 0.0:
        return math.inf
    if s >= 1.0:
        return -math.inf
    return math.log((1 - s) / s)


@torch.no_grad()
def solve_teacher_ode(teacher: TeacherFlow, noise: torch.Tensor, grid: torch.Tensor, solver: str, cond: dict,
                      uncond: dict | None, guidance: float, record: list[int] | None = None):
    """Integrate the guided ODE from ``noise`` (the pipeline's initial latent) along ``grid``.

    Returns ``(z_data, states)``: the state at ``s = 0`` and the flow states at the grid indices ``record``
    (stacked on dim 1, ``(B, len(record), ...)``), all float32 on the model's device."""
    if solver not in SOLVERS:
        raise CouplingError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    g = [float(x) for x in grid]
    record = list(record or [])
    z = teacher.start_state(noise.to(teacher.device))
    states = {0: z} if 0 in record else {}
    prev_d, prev_h = None, None
    for i in range(len(g) - 1):
        s, s1 = g[i], g[i + 1]
        v = teacher.velocity(z, s, cond, uncond, guidance)
        if solver == "ddim" or (solver == "euler" and teacher.kind == "flow"):
            z = z + (s1 - s) * v
        elif solver == "euler":  # Karras/EDM ODE: y = x_t/alpha = z/(1-s), sigma_ve = s/(1-s), dy/dsigma_ve = eps
            eps = z + (1 - s) * v
            y = z / (1 - s) + (s1 / (1 - s1) - s / (1 - s)) * eps
            z = (1 - s1) * y
        else:  # DPM-Solver++(2M), data prediction, in flow coordinates: z' = (s'/s) z + (1 - s'/s) D
            d = z - s * v
            h = _lam(s1) - _lam(s)
            ratio = s1 / s
            if prev_d is None or s1 == 0.0 or not math.isfinite(prev_h) or not math.isfinite(h):
                d_eff = d
            else:
                r = prev_h / h
                d_eff = d + (d - prev_d) / (2 * r)
            z = ratio * z + (1 - ratio) * d_eff
            prev_d, prev_h = d, h
        if i + 1 in record:
            states[i + 1] = z
    stacked = torch.stack([states[j] for j in record], dim=1) if record else None
    return z, stacked


# ----------------------------------------------------------------------------------------------------
# generation


@dataclass
class CouplingRunResult:
    out_dir: Path
    num_couplings: int
    num_generated: int            # couplings computed by this call (the rest were already on disk)
    shards_written: list[str]
    shards_skipped: list[str]
    seconds: float                # wall time spent generating (excludes skipped shards)
    couplings_per_second: float   # num_generated / seconds (0 when nothing was generated)
    manifest: dict = field(repr=False, default_factory=dict)


def _prompts_table(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
    table, row, index = [], {}, []
    for p in prompts:
        if p not in row:
            row[p] = len(table)
            table.append(p)
        index.append(row[p])
    return table, torch.tensor(index, dtype=torch.long)


def _sha(prompts: list[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _initial_noise(indices, seed: int, shape) -> torch.Tensor:
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + int(i)))
                      for i in indices])


def _cond_rows(emb: dict, rows: torch.Tensor, device, dtype, time_ids) -> dict:
    out = {"prompt_embeds": emb["prompt_embeds"][rows].to(device, dtype)}
    if "pooled" in emb:
        out["pooled"] = emb["pooled"][rows].to(device, dtype)
    if time_ids is not None:
        out["time_ids"] = time_ids.reshape(1, -1).expand(len(rows), -1).to(device, dtype)
    return out


def _check_args(manifest: dict, args: dict, out_dir: Path):
    old = manifest.get("args", {})
    diff = [k for k in sorted(set(old) | set(args)) if old.get(k) != args.get(k)]
    if diff:
        lines = "; ".join(f"{k}: on disk {old.get(k)!r}, requested {args.get(k)!r}" for k in diff)
        raise CouplingArgumentsMismatch(
            f"{out_dir} holds couplings generated with different arguments ({lines}). Re-run with the original "
            "arguments to resume that run, or pass a new output directory")


def _shard_is_complete(path: Path, fingerprint: str, n: int) -> bool:
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return meta.get("fingerprint") == fingerprint and int(meta.get("count", -1)) == n
    except Exception:  # a foreign or damaged file: regenerate it
        return False


@torch.no_grad()
def generate_couplings(pipe, prompts: list[str], out_dir: str | Path, *, num_steps: int = 25, solver: str = "ddim",
                       guidance_scale: float = 5.0, num_windows: int = 1, seed: int = 0, shard_size: int = 256,
                       batch_size: int = 64, spacing: str = "sigma", height: int | None = None,
                       width: int | None = None, storage_dtype: str = "float32", model_id: str = "",
                       progress: bool = True, stop_after_shards: int | None = None) -> CouplingRunResult:
    """Generate (or finish) one coupling per prompt into ``out_dir``; see the module docstring for the format.

    Coupling ``i`` starts from ``torch.Generator().manual_seed(seed + i)`` and does not depend on
    ``batch_size`` (up to float rounding of batched kernels). Re-running with the same arguments skips the
    shards already written; different arguments raise :class:`CouplingArgumentsMismatch`. ``batch_size`` and
    ``progress`` may change between runs. ``stop_after_shards`` is a test hook: raise
    :class:`CouplingInterrupted` after writing that many shards in this call."""
    prompts = list(prompts)
    if not prompts:
        raise CouplingError("no prompts to generate couplings for")
    if storage_dtype not in STORAGE_DTYPES:
        raise CouplingError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise CouplingError("shard_size and batch_size must be >= 1")
    out_dir = Path(out_dir)
    teacher = TeacherFlow(pipe, height, width)
    teacher.check_guidance(guidance_scale)
    shape = teacher.shape
    grid, bidx = coupling_grid(num_steps, num_windows, teacher.sigma_max, spacing, teacher)
    if solver not in SOLVERS:
        raise CouplingError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    table, prompt_index = _prompts_table(prompts)
    n_total = len(prompts)
    n_shards = (n_total + shard_size - 1) // shard_size
    shard_names = [f"couplings-{j:05d}.safetensors" for j in range(n_shards)]
    args = {"version": COUPLINGS_VERSION, "model": model_id, **teacher.describe(), "solver": solver,
            "num_steps": int(num_steps), "spacing": spacing, "guidance_scale": float(guidance_scale),
            "num_windows": int(num_windows), "seed": int(seed), "shard_size": int(shard_size),
            "num_couplings": n_total, "prompts_sha256": _sha(prompts), "latent_shape": list(shape),
            "storage_dtype": storage_dtype}
    fingerprint = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]

    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        _check_args(manifest, args, out_dir)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest = None
    time_ids = teacher.time_ids(shape)
    if manifest is None or not (out_dir / EMBEDDINGS).exists():
        emb = teacher.encode_table(table, batch_size)
        _atomic_save(emb, out_dir / EMBEDDINGS, metadata={"fingerprint": fingerprint})
    else:
        emb = load_file(str(out_dir / EMBEDDINGS))
    if manifest is None:
        vae_cfg = getattr(getattr(pipe, "vae", None), "config", {}) or {}
        manifest = {
            "version": COUPLINGS_VERSION, "fingerprint": fingerprint, "args": args,
            "model": model_id, "pipeline": type(pipe).__name__, "teacher": teacher.kind,
            "prediction_type": teacher.prediction_type, "solver": solver, "num_steps": int(num_steps),
            "spacing": spacing, "guidance_scale": float(guidance_scale), "num_windows": int(num_windows),
            "seed": int(seed), "sigma_max": float(teacher.sigma_max),
            "sigma_boundaries": [float(grid[i]) for i in bidx], "step_sigmas": [float(x) for x in grid],
            "boundary_grid_indices": bidx, "latent_shape": list(shape), "storage_dtype": storage_dtype,
            "num_couplings": n_total, "shard_size": int(shard_size), "prompts": table,
            "uncond_index": len(table), "embeddings": EMBEDDINGS, "shards": shard_names, "completed": [],
            "time_ids": None if time_ids is None else time_ids.tolist(),
            "flow_family": teacher.family, "guidance_embeds": teacher.guidance_embeds,
            "vae_scaling_factor": float(vae_cfg.get("scaling_factor", 1.0) or 1.0),
            "vae_shift_factor": float(vae_cfg.get("shift_factor", None) or 0.0),
            "conventions": {
                "flow": "s=1 noise, s=0 data; z_s = (1-s) x0 + s eps; v = dz/ds = eps - x0",
                "noise": "torch.randn((1, C, H, W), generator=torch.Generator().manual_seed(seed + i)): the "
                         "pipeline's initial latent (VP: x_T at the last training timestep; flow: z at s=1; FLUX: "
                         "unpacked, FluxPipeline packs it into 2x2 patch tokens)",
                "boundary_states": "flow states z at sigma_boundaries (descending); [0] = start state "
                                   "(VP: sqrt((1-s_max)^2+s_max^2) * noise), [K] = data",
                "data": "ODE endpoint at s=0, model latent space (VAE-scaled)",
                "prompt_index": "row of embeddings.safetensors; the last row is the unconditional embedding",
            },
        }
        _atomic_write_json(manifest, manifest_path)

    completed = set(manifest.get("completed", []))
    todo, skipped = [], []
    for j, name in enumerate(shard_names):
        n = min(shard_size, n_total - j * shard_size)
        if name in completed and (out_dir / name).exists():
            skipped.append(name)
        elif _shard_is_complete(out_dir / name, fingerprint, n):  # written, crashed before the manifest update
            skipped.append(name)
            completed.add(name)
        else:
            todo.append(j)
    if skipped and set(manifest.get("completed", [])) != completed:
        manifest["completed"] = [s for s in shard_names if s in completed]
        _atomic_write_json(manifest, manifest_path)

    store = STORAGE_DTYPES[storage_dtype]
    uncond_row = torch.tensor([len(table)])
    bar = tqdm(total=n_total, initial=n_total - sum(min(shard_size, n_total - j * shard_size) for j in todo),
               unit="coupling", desc="teacher couplings", disable=not progress)
    written, generated, elapsed = [], 0, 0.0
    device = teacher.device
    try:
        for j in todo:
            lo, hi = j * shard_size, min((j + 1) * shard_size, n_total)
            parts = {"noise": [], "data": [], "boundary_states": []}
            for b0 in range(lo, hi, batch_size):
                ids = list(range(b0, min(b0 + batch_size, hi)))
                t0 = time.perf_counter()
                noise = _initial_noise(ids, seed, shape)
                rows = prompt_index[ids]
                cond = _cond_rows(emb, rows, device, teacher.dtype, time_ids)
                uncond = None if guidance_scale == 1.0 or not teacher.uses_cfg else _cond_rows(
                    emb, uncond_row.expand(len(ids)), device, teacher.dtype, time_ids)
                z_data, states = solve_teacher_ode(teacher, noise, grid, solver, cond, uncond, guidance_scale, bidx)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed += time.perf_counter() - t0
                generated += len(ids)
                parts["noise"].append(noise)
                parts["data"].append(z_data.cpu())
                parts["boundary_states"].append(states.cpu())
                bar.update(len(ids))
                bar.set_postfix(couplings_per_s=f"{generated / max(elapsed, 1e-9):.3g}")
            n = hi - lo
            tensors = {k: torch.cat(v).to(store) for k, v in parts.items()}
            tensors.update(prompt_index=prompt_index[lo:hi].clone(),
                           seed=torch.arange(seed + lo, seed + hi, dtype=torch.long),
                           guidance=torch.full((n,), float(guidance_scale), dtype=torch.float32),
                           index=torch.arange(lo, hi, dtype=torch.long))
            name = shard_names[j]
            _atomic_save(tensors, out_dir / name, metadata={"fingerprint": fingerprint, "count": str(n),
                                                            "first_index": str(lo)})
            completed.add(name)
            manifest["completed"] = [s for s in shard_names if s in completed]
            _atomic_write_json(manifest, manifest_path)
            written.append(name)
            if stop_after_shards is not None and len(written) >= stop_after_shards and len(completed) < n_shards:
                raise CouplingInterrupted(f"stopped after {len(written)} shard(s) (test hook)")
    finally:
        bar.close()
    return CouplingRunResult(out_dir=out_dir, num_couplings=n_total, num_generated=generated,
                             shards_written=written, shards_skipped=skipped, seconds=elapsed,
                             couplings_per_second=generated / elapsed if elapsed > 0 else 0.0, manifest=manifest)


# ----------------------------------------------------------------------------------------------------
# reading


class CouplingSet:
    """A finished couplings directory, read for training.

    ``boundary_states`` are held in memory when they fit in ``max_in_memory_bytes``, else read per batch from
    the (memory-mapped) shards."""

    def __init__(self, out_dir: str | Path, max_in_memory_bytes: int = 8 << 30):
        self.dir = Path(out_dir)
        path = self.dir / MANIFEST
        if not path.exists():
            raise CouplingError(f"no couplings at {self.dir} (no {MANIFEST}); generate them with "
                                "`stepdistill reflow couple --out DIR ...`")
        self.manifest = json.loads(path.read_text())
        missing = [s for s in self.manifest["shards"] if s not in set(self.manifest.get("completed", []))
                   or not (self.dir / s).exists()]
        if missing:
            raise CouplingError(f"couplings at {self.dir} are incomplete ({len(missing)} of "
                                f"{len(self.manifest['shards'])} shards missing, e.g. {missing[0]}); re-run the same "
                                "`stepdistill reflow couple` command to finish them")
        emb = load_file(str(self.dir / self.manifest["embeddings"]))
        self.prompt_embeds = emb["prompt_embeds"]
        self.pooled = emb.get("pooled")
        self.time_ids = None if self.manifest.get("time_ids") is None else torch.tensor(self.manifest["time_ids"])
        self.sigma_boundaries = torch.tensor(self.manifest["sigma_boundaries"], dtype=torch.float64)
        self.num_windows = int(self.manifest["num_windows"])
        small = {}
        counts = []
        for s in self.manifest["shards"]:
            with safe_open(str(self.dir / s), framework="pt") as f:
                for k in ("prompt_index", "seed", "index"):
                    small.setdefault(k, []).append(f.get_tensor(k))
                counts.append(int(f.metadata()["count"]))
        self.prompt_index = torch.cat(small["prompt_index"])
        self.seed = torch.cat(small["seed"])
        self.offsets = np.cumsum([0] + counts)
        per = int(np.prod(self.manifest["latent_shape"])) * (self.num_windows + 1) * 4
        self.in_memory = per * len(self) <= max_in_memory_bytes
        self._handles = {}
        self._states = None
        if self.in_memory:
            self._states = torch.cat([load_file(str(self.dir / s))["boundary_states"].float()
                                      for s in self.manifest["shards"]])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def uncond_index(self) -> int:
        return len(self.prompt_embeds) - 1

    def _handle(self, j: int):
        if j not in self._handles:
            self._handles[j] = safe_open(str(self.dir / self.manifest["shards"][j]), framework="pt")
        return self._handles[j]

    def boundary_states(self, idx: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, K+1, C, H, W)`` (``which is None``) or ``(B, C, H, W)``: boundary ``which[b]`` of coupling
        ``idx[b]`` (float32)."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if self._states is not None:
            rows = self._states[idx]
        else:
            out = []
            for i in idx.tolist():
                j = int(np.searchsorted(self.offsets, i, side="right") - 1)
                local = i - int(self.offsets[j])
                out.append(self._handle(j).get_slice("boundary_states")[local:local + 1].float())
            rows = torch.cat(out)
        if which is None:
            return rows
        which = torch.as_tensor(which, dtype=torch.long).reshape(-1)
        return rows[torch.arange(len(idx)), which]

    def tensor(self, name: str) -> torch.Tensor:
        """A whole per-coupling tensor (``noise``, ``data``, ...) concatenated over shards (for tests/diagnostics)."""
        return torch.cat([load_file(str(self.dir / s))[name] for s in self.manifest["shards"]])

    @property
    def flow_family(self) -> str | None:
        """``"sd3"`` / ``"flux"`` for flow-matching teachers (manifests from before FLUX support: SD3), else None."""
        if self.manifest["teacher"] != "flow":
            return None
        return self.manifest.get("flow_family") or "sd3"

    def conditioning(self, idx: torch.Tensor) -> dict:
        """Model keyword arguments for couplings ``idx`` (CPU tensors): ``encoder_hidden_states``, plus SDXL's
        ``added_cond_kwargs`` or SD3/FLUX's ``pooled_projections``, plus FLUX-dev's embedded ``guidance`` (the
        couplings' guidance scale) for models with ``guidance_embeds``."""
        rows = self.prompt_index[torch.as_tensor(idx, dtype=torch.long)]
        cond = {"encoder_hidden_states": self.prompt_embeds[rows]}
        if self.pooled is not None and self.time_ids is not None:
            cond["added_cond_kwargs"] = {"text_embeds": self.pooled[rows],
                                         "time_ids": self.time_ids.reshape(1, -1).expand(len(rows), -1).clone()}
        elif self.pooled is not None:
            cond["pooled_projections"] = self.pooled[rows]
        if self.manifest.get("guidance_embeds"):
            cond["guidance"] = torch.full((len(rows),), float(self.manifest["guidance_scale"]))
        return cond


def load_couplings(out_dir: str | Path, **kw) -> CouplingSet:
    return CouplingSet(out_dir, **kw)


# ----------------------------------------------------------------------------------------------------
# choosing a coupling solver


@torch.no_grad()
def coupling_solver_error(pipe, prompts: list[str], solvers=(("ddim", 10), ("ddim", 25), ("dpmpp", 10),
                                                             ("dpmpp", 25), ("euler", 25)),
                          reference=("ddim", 1000), *, guidance_scale: float = 5.0, num_windows: int = 1,
                          seed: int = 0, batch_size: int = 64, spacing: str = "sigma", height: int | None = None,
                          width: int | None = None) -> dict:
    """How far each ``(solver, steps[, spacing])`` lands from a many-step reference solve from the same noise.

    Returns ``{"reference": {...}, "results": [{"solver", "steps", "spacing", "nfe", "rmse", "rmse_max",
    "seconds", "seconds_per_coupling"}, ...]}``; ``rmse`` is the mean over prompts of the per-sample RMSE of
    ``z_data`` (:func:`stepdistill.reflow.coupling_error`), ``nfe`` the guided model evaluations per coupling
    (x2 forward passes with CFG). The reference is itself a discretization: a first-order reference (``ddim``)
    at N steps has an error ~1/N, so compare high-order solvers against a reference well below their own error
    (e.g. ``("dpmpp", 500)``)."""
    teacher = TeacherFlow(pipe, height, width)
    teacher.check_guidance(guidance_scale)
    prompts = list(prompts)
    shape = teacher.shape
    table, rows_all = _prompts_table(prompts)
    emb = teacher.encode_table(table, batch_size)
    time_ids = teacher.time_ids(shape)
    device = teacher.device

    def run(solver, steps, spc):
        grid, _ = coupling_grid(steps, num_windows, teacher.sigma_max, spc, teacher)
        outs, t_total = [], 0.0
        for b0 in range(0, len(prompts), batch_size):
            ids = list(range(b0, min(b0 + batch_size, len(prompts))))
            noise = _initial_noise(ids, seed, shape)
            cond = _cond_rows(emb, rows_all[ids], device, teacher.dtype, time_ids)
            uncond = None if guidance_scale == 1.0 or not teacher.uses_cfg else _cond_rows(
                emb, torch.full((len(ids),), len(table)), device, teacher.dtype, time_ids)
            t0 = time.perf_counter()
            z, _ = solve_teacher_ode(teacher, noise, grid, solver, cond, uncond, guidance_scale)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_total += time.perf_counter() - t0
            outs.append(z.float().cpu())
        return torch.cat(outs), t_total

    def parse(entry):
        solver, steps = entry[0], int(entry[1])
        return solver, steps, entry[2] if len(entry) > 2 else spacing

    r_solver, r_steps, r_spacing = parse(reference)
    ref, ref_t = run(r_solver, r_steps, r_spacing)
    results = []
    for entry in solvers:
        solver, steps, spc = parse(entry)
        z, sec = run(solver, steps, spc)
        err = reflow.coupling_error(z, ref)
        results.append({"solver": solver, "steps": steps, "spacing": spc, "nfe": steps,
                        "rmse": float(err.mean()), "rmse_max": float(err.max()), "seconds": sec,
                        "seconds_per_coupling": sec / len(prompts)})
    return {"reference": {"solver": r_solver, "steps": r_steps, "spacing": r_spacing, "seconds": ref_t,
                          "data_rms": float(ref.pow(2).mean().sqrt())},
            "num_prompts": len(prompts), "guidance_scale": guidance_scale, "num_windows": num_windows,
            "teacher": teacher.kind, "results": results}


# ----------------------------------------------------------------------------------------------------
# command line: `stepdistill reflow couple | train | solver-error`


def read_prompts(source: str) -> list[str]:
    """``toy:N`` (or ``toy:N:SEED``): N seeded toy-world prompts; otherwise a text file, one prompt per line
    (blank lines skipped)."""
    if source.startswith("toy:"):
        from .toy.world import evaluation_prompts

        parts = source.split(":")
        try:
            n = int(parts[1])
            prompt_seed = int(parts[2]) if len(parts) > 2 else 0
        except (IndexError, ValueError) as e:
            raise CouplingError(f"prompt source {source!r}: expected toy:N or toy:N:SEED") from e
        return evaluation_prompts(n, seed=prompt_seed)
    path = Path(source)
    if not path.is_file():
        raise CouplingError(f"prompt source {source!r} is neither toy:N nor a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise CouplingError(f"{path} holds no prompts")
    return prompts


def _default_guidance(model: str, guidance: float | None, pipe=None) -> float:
    if guidance is not None:
        return guidance
    if model == "toy":
        from .toy.world import TOY_GUIDANCE

        return TOY_GUIDANCE
    if pipe is not None and flow_family_of(getattr(pipe, "transformer", None)) == "flux":
        # FLUX has no CFG here: the embedded guidance of FLUX.1-dev's pipeline default, or 1 (schnell-like)
        return 3.5 if getattr(pipe.transformer.config, "guidance_embeds", False) else 1.0
    return 7.5


def _cmd_couple(args):
    from .sampling import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    if args.lora:  # couplings of a student (InstaFlow's 2nd stage: the reflowed model's own ODE), LoRAs fused
        from .cli import _parse_lora
        from .sampling import load_loras_into_pipeline

        load_loras_into_pipeline(pipe, [_parse_lora(x) for x in args.lora], fuse=True)
    prompts = read_prompts(args.prompts)
    guidance = 1.0 if args.lora and args.guidance is None else _default_guidance(args.model, args.guidance, pipe)
    res = generate_couplings(pipe, prompts, args.out, num_steps=args.steps, solver=args.solver,
                             guidance_scale=guidance, num_windows=args.windows, seed=args.seed,
                             shard_size=args.shard_size, batch_size=args.batch_size, spacing=args.spacing,
                             storage_dtype=args.storage_dtype, model_id=args.model,
                             height=args.resolution, width=args.resolution)
    print(f"{res.out_dir}: {res.num_couplings} couplings ({len(res.shards_skipped)} shard(s) already done, "
          f"{len(res.shards_written)} written); {res.num_generated} generated in {res.seconds:.1f} s = "
          f"{res.couplings_per_second:.2f} couplings/s on {pipe.device} ({args.solver}, {args.steps} steps, "
          f"guidance {guidance}, K={args.windows})")


def _cmd_train(args):
    import yaml

    from .config import ConfigError, load_config, parse_override
    from .training import train

    config_path, override_specs = args.config, list(args.overrides)
    if config_path and "=" in config_path and not Path(config_path).exists():  # only overrides were given
        config_path, override_specs = None, [config_path] + override_specs
    overrides = dict(parse_override(o) for o in override_specs)
    if overrides.get("method", "reflow") != "reflow":
        raise ConfigError("`reflow train` trains method=reflow; use the LCD command for other methods")
    if config_path:
        data = yaml.safe_load(Path(config_path).read_text()) or {}
        if isinstance(data, dict) and data.get("method", "reflow") != "reflow":
            raise ConfigError(f"{config_path} is a method={data['method']!r} recipe, not a reflow one")
    overrides["method"] = "reflow"
    if args.couplings:
        overrides["couplings_dir"] = args.couplings
    config = load_config(config_path, **overrides)
    if not config.couplings_dir:
        raise ConfigError("reflow needs couplings: pass --couplings DIR or couplings_dir=DIR (made by "
                          "`stepdistill reflow couple`)")
    out = train(config)
    print(f"wrote the reflow LoRA to {out}")


def _cmd_solver_error(args):
    from .sampling import load_pipeline

    def parse(spec):
        bits = spec.split(":")
        if len(bits) not in (2, 3):
            raise CouplingError(f"solver spec {spec!r}: expected SOLVER:STEPS or SOLVER:STEPS:SPACING")
        return (bits[0], int(bits[1]), *bits[2:])

    pipe = load_pipeline(args.model, device=args.device)
    prompts = read_prompts(args.prompts)
    guidance = _default_guidance(args.model, args.guidance, pipe)
    report = coupling_solver_error(pipe, prompts, [parse(s) for s in args.solvers.split(",")],
                                   reference=parse(args.reference), guidance_scale=guidance,
                                   num_windows=args.windows, seed=args.seed, batch_size=args.batch_size)
    ref = report["reference"]
    print(f"reference {ref['solver']}:{ref['steps']} ({ref['seconds']:.1f} s, data rms {ref['data_rms']:.3f}), "
          f"{report['num_prompts']} prompts, guidance {guidance}")
    print(f"{'solver':>8} {'steps':>6} {'spacing':>8} {'rmse':>10} {'max':>10} {'s/coupling':>11}")
    for r in report["results"]:
        print(f"{r['solver']:>8} {r['steps']:>6} {r['spacing']:>8} {r['rmse']:>10.5f} {r['rmse_max']:>10.5f} "
              f"{r['seconds_per_coupling']:>11.5f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def add_reflow_commands(subparsers) -> argparse.ArgumentParser:
    """Register ``reflow couple | train | solver-error`` on an argparse ``subparsers`` object."""
    r = subparsers.add_parser("reflow", help="reflow / PeRFlow: teacher couplings and rectified-flow LoRA training")
    rsub = r.add_subparsers(dest="reflow_command", required=True)

    def common(p, prompts_default):
        p.add_argument("--model", default="toy", help="'toy', a local pipeline directory or a hub id")
        p.add_argument("--prompts", default=prompts_default,
                       help="toy:N[:SEED] (seeded toy-world prompts) or a text file with one prompt per line")
        p.add_argument("--guidance", type=float, default=None,
                       help="CFG scale baked into the couplings (default: 5 for the toy teacher, else 7.5); FLUX: the "
                            "embedded guidance (default 3.5 with a guidance embedding, else 1: no CFG)")
        p.add_argument("--windows", type=int, default=1, help="K, the PeRFlow windows (1 = InstaFlow-style reflow)")
        p.add_argument("--seed", type=int, default=0, help="coupling i uses noise seed SEED + i")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--device", default=None, help="default: cuda when available, else cpu")

    c = rsub.add_parser("couple", help="generate (or resume) teacher couplings")
    common(c, "toy:1024")
    c.add_argument("--out", required=True, help="couplings directory (resumable)")
    c.add_argument("--steps", type=int, default=25, help="ODE steps (>= windows)")
    c.add_argument("--solver", choices=SOLVERS, default="ddim")
    c.add_argument("--spacing", choices=SPACINGS, default="sigma",
                   help="steps inside a window: uniform in flow time, or in the teacher's own clock")
    c.add_argument("--shard-size", type=int, default=256)
    c.add_argument("--storage-dtype", choices=sorted(STORAGE_DTYPES), default="float32")
    c.add_argument("--lora", action="append", default=[],
                   help="PATH[:WEIGHT], fused into the model first: couplings of a student (e.g. the reflow LoRA, "
                        "for the one-step distillation stage; guidance then defaults to 1)")
    c.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels (default: the model's own, e.g. 512 for SD 1.5, 1024 for SDXL/SD3/FLUX)")
    c.set_defaults(func=_cmd_couple)

    t = rsub.add_parser("train", help="train a reflow LoRA on couplings (a YAML recipe + key=value overrides)")
    t.add_argument("config", nargs="?", default=None, help="YAML recipe (optional)")
    t.add_argument("overrides", nargs="*", default=[], help="key=value config overrides, e.g. max_train_steps=500")
    t.add_argument("--couplings", default=None, help="shorthand for couplings_dir=DIR")
    t.set_defaults(func=_cmd_train)

    e = rsub.add_parser("solver-error", help="RMSE of cheap coupling solvers against a many-step reference")
    common(e, "toy:16")
    e.add_argument("--solvers", default="ddim:10,ddim:25,dpmpp:10,dpmpp:25,euler:25",
                   help="comma-separated SOLVER:STEPS[:SPACING]")
    e.add_argument("--reference", default="ddim:1000", help="SOLVER:STEPS[:SPACING] of the reference solve")
    e.add_argument("--json", default=None, help="also write the report here")
    e.set_defaults(func=_cmd_solver_error)
    return r
