"""A diffusers scheduler for piecewise-rectified-flow students (PeRFlow, arXiv:2405.07510), usable as a
drop-in ``pipe.scheduler`` of a stock ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline``.

Clock and windows (see :mod:`stepdistill.reflow` for the conventions): flow time ``s`` runs from
``sigma_max`` (noise) down to 0 (data); the ``K = num_windows`` training windows are uniform in ``s``,
``scheduler.window_sigmas == reflow.window_boundaries(K, sigma_max=scheduler.sigma_max)``. A reflow/PeRFlow
student must be trained on exactly these windows; for a VP (SD) UNet, ``sigma_max`` is the flow time of the
last training timestep (``parametrization.vp_sigma_max(alphas_cumprod)``, ~0.936 for SD 1.5), because flow times
above it have no VP timestep and an epsilon model has no velocity at ``s = 1``.

State space
-----------
The pipeline's ``latents`` are always what the UNet consumes, so ``scale_model_input`` is the identity:

* VP prediction types (``"epsilon"``, ``"v_prediction"``, ``"sample"``: an SD UNet, possibly with a reflow
  LoRA): latents are VP states ``x_t = alpha x0 + sigma eps``; ``timesteps`` are the (continuous, float32)
  VP timesteps ``t(s)`` with ``sigma_t/(alpha_t+sigma_t) = s``; ``init_noise_sigma = 1`` (``x_T ~ N(0, I)``, as
  for every SD scheduler). Each ``step`` converts to flow coordinates ``z = x_t/(alpha+sigma)``, turns the
  model output into the flow velocity ``eps - x0`` (:func:`stepdistill.parametrization.velocity_from_vp_output`),
  takes one Euler step ``z' = z + (s' - s) v`` and maps back ``x' = (alpha'+sigma') z'``. In flow
  coordinates this is exactly a DDIM step between ``t(s)`` and ``t(s')``; the last step lands on ``s = 0``
  where ``alpha = 1``, ``sigma = 0`` and the returned latent is ``x0``.
* ``"flow"`` (a model that predicts the FlowMatch velocity ``noise - x0`` from flow states, timestep
  ``s * num_train_timesteps`` as in diffusers' ``FlowMatchEulerDiscreteScheduler``): latents are flow states
  ``x_s``; ``sigma_max = 1`` by default and ``init_noise_sigma = sqrt((1-s_max)^2 + s_max^2)`` (``= 1``);
  ``step`` is the plain Euler step of ``FlowMatchEulerDiscreteScheduler``. A model trained in Rectified
  Flow/InstaFlow's convention (predicting data minus noise) must be negated
  (:func:`stepdistill.reflow.rf_velocity_to_flow`).

Step placement (``set_timesteps(N)``)
-------------------------------------
* ``N >= K``: every window boundary is a step point, so no Euler step crosses a window boundary (where the
  student's velocity jumps). Window ``k`` gets ``N // K`` uniform steps, and the first (noisiest)
  ``N % K`` windows get one more (PeRFlow's rule). ``N = K`` is one step per window, exact for a perfectly
  straightened student.
* ``N < K``: allowed, with a ``UserWarning``: the step points are the ``N + 1`` window boundaries with
  indices ``round(linspace(0, K, N + 1))``, so each step starts on a window boundary and spans whole
  windows, extrapolating the first window's chord. Exact only where the flow is straight across the merged
  windows (e.g. a globally straight flow, or a K=1 reflow student); otherwise a coarser approximation.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from diffusers.utils import BaseOutput

from . import parametrization as param
from . import reflow

VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
PREDICTION_TYPES = VP_PREDICTION_TYPES + ("flow",)


@dataclass
class PiecewiseRectifiedFlowSchedulerOutput(BaseOutput):
    """``prev_sample``: the latent at the next step point (VP state or flow state, as the input);
    ``pred_original_sample``: the current ``x0`` estimate ``z - s v``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas) -> torch.Tensor:
    if trained_betas is not None:
        return torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # Stable Diffusion's
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":

        return betas_for_alpha_bar(num_train_timesteps)
    raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not implemented")


class PiecewiseRectifiedFlowScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler on window-aligned flow times for (piecewise) rectified-flow students.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the VP teacher's noise
            schedule (SD 1.5: 1000, 0.00085, 0.012, ``"scaled_linear"``); ``from_config(sd_scheduler.config)``
            picks them up.
        prediction_type: ``"epsilon"`` | ``"v_prediction"`` | ``"sample"`` (VP UNet, VP-space latents) or
            ``"flow"`` (FlowMatch velocity, flow-space latents). See the module docstring.
        num_windows: K, the number of PeRFlow windows the student was trained on (1 = plain reflow).
        sigma_max: the noisiest flow time; ``None`` = the last VP timestep's flow time for VP types, 1 for
            ``"flow"``. For VP types it may not exceed that value.
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        num_windows: int = 4,
        sigma_max: float | None = None,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if int(num_windows) < 1:
            raise ValueError(f"num_windows must be >= 1, got {num_windows}")
        self.betas = _make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

        vp_max = param.vp_sigma_max(self.alphas_cumprod)
        if sigma_max is None:
            sigma_max = 1.0 if prediction_type == "flow" else vp_max
        sigma_max = float(sigma_max)
        if not 0.0 < sigma_max <= 1.0:
            raise ValueError(f"sigma_max must be in (0, 1], got {sigma_max}")
        if prediction_type != "flow" and sigma_max > vp_max + 1e-6:
            raise ValueError(
                f"sigma_max={sigma_max} is noisier than the schedule's last timestep (flow time {vp_max:.4f}); "
                "a VP model cannot be queried there"
            )
        self.sigma_max = sigma_max
        # the SD pipeline multiplies N(0, I) by this: VP states have unit variance, flow states
        # x_s = (1-s) x0 + s eps have (for unit-variance data) std sqrt((1-s)^2 + s^2)
        self.init_noise_sigma = 1.0 if self.is_vp else float(param.flow_scale(sigma_max))

        self.num_inference_steps: int | None = None
        self.sigmas: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ------------------------------------------------------------------ properties
    @property
    def is_vp(self) -> bool:
        """True when latents are VP states (VP prediction types), False for flow states (``"flow"``)."""
        return self.config.prediction_type != "flow"

    @property
    def window_sigmas(self) -> torch.Tensor:
        """The K+1 training window boundaries, from ``sigma_max`` down to 0."""
        return reflow.window_boundaries(self.config.num_windows, sigma_max=self.sigma_max)

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Called by img2img-style pipelines: the first ``step`` is the ``begin_index``-th."""
        self._begin_index = begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ schedule
    def window_aligned_sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """The ``N + 1`` flow times (float64, ``sigma_max`` ... 0) of ``N`` steps; see the module docstring."""
        N, K = int(num_inference_steps), int(self.config.num_windows)
        if N < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {N}")
        b = torch.linspace(self.sigma_max, 0.0, K + 1, dtype=torch.float64)
        if N >= K:
            q, r = divmod(N, K)
            pts = []
            for k in range(K):
                n_k = q + 1 if k < r else q
                pts.append(torch.linspace(float(b[k]), float(b[k + 1]), n_k + 1, dtype=torch.float64)[:-1])
            pts.append(b[-1:])
            return torch.cat(pts)
        warnings.warn(
            f"{N} inference steps for {K} reflow windows: each step spans several windows, which is exact only "
            "where the flow is straight across them; use a multiple of num_windows for the trained behaviour",
            UserWarning,
            stacklevel=3,
        )
        idx = np.round(np.linspace(0, K, N + 1)).astype(np.int64)
        return b[torch.from_numpy(idx)]

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | np.ndarray | torch.Tensor | None = None,
        timesteps: list[float] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Place the steps (window-aligned, see the module docstring) and set ``sigmas`` (``N + 1`` flow times,
        float32, ending at 0) and ``timesteps`` (``N`` float32 model timesteps: VP timesteps ``t(s)`` for VP
        types, ``s * num_train_timesteps`` for ``"flow"``).

        Custom ``sigmas`` (descending flow times) or ``timesteps`` (descending model timesteps) are used as
        given, with no window alignment; a terminal 0 is appended to sigmas that lack it."""
        T = self.config.num_train_timesteps
        if sum(x is not None for x in (num_inference_steps, sigmas, timesteps)) != 1:
            raise ValueError("pass exactly one of num_inference_steps, sigmas or timesteps")
        if num_inference_steps is not None:
            s = self.window_aligned_sigmas(num_inference_steps)
        else:
            if sigmas is not None:
                s = torch.as_tensor(np.asarray(sigmas, dtype=np.float64)).reshape(-1)
            else:
                t = torch.as_tensor(np.asarray(timesteps, dtype=np.float64)).reshape(-1)
                s = param.sigma_for_vp_timestep(t, self.alphas_cumprod) if self.is_vp else t / T
            if s[-1] != 0:
                s = torch.cat([s, s.new_zeros(1)])
            if torch.any(s[1:] >= s[:-1]) or s[0] > self.sigma_max + 1e-6:
                raise ValueError(f"custom sigmas must be strictly decreasing and <= sigma_max={self.sigma_max}")
        self.num_inference_steps = len(s) - 1
        if self.is_vp:
            ts = param.vp_timestep_for_sigma(s[:-1], self.alphas_cumprod)
        else:
            ts = (s[:-1] * T).float()
        self.sigmas = s.float().to(device)
        self.timesteps = ts.float().to(device)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        t = torch.as_tensor(timestep, dtype=torch.float32, device=schedule_timesteps.device)
        indices = ((schedule_timesteps.float() - t).abs() < 1e-3).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {float(t)} is not one of scheduler.timesteps {schedule_timesteps.tolist()}")
        # as in diffusers: with duplicates, the first step takes the second match (img2img safety)
        pos = 1 if len(indices) > 1 else 0
        return int(indices[pos].item())

    def _init_step_index(self, timestep) -> None:
        if self.begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    # ------------------------------------------------------------------ sampling
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: the latents are kept in the space the model consumes (VP or flow, see the module docstring)."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> PiecewiseRectifiedFlowSchedulerOutput | tuple:
        """One Euler step in flow coordinates from ``sigmas[i]`` to ``sigmas[i+1]``.

        VP types: ``z = sqrt((1-s)^2+s^2) x_t``, ``v = velocity_from_vp_output(...)``, ``z' = z + (s'-s) v``,
        ``x' = z' / sqrt((1-s')^2+s'^2)``. ``"flow"``: ``x' = x + (s'-s) v``."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise IndexError(f"step {i} past the last of {self.num_inference_steps} steps; call set_timesteps again")
        s = float(self.sigmas[i])
        s_next = float(self.sigmas[i + 1])
        x = sample.float()
        if self.is_vp:
            v = param.velocity_from_vp_output(model_output, x, param.vp_abar_of_sigma(s), self.config.prediction_type)
            z = x * float(param.flow_scale(s))
            z_next = z + (s_next - s) * v
            prev = z_next / float(param.flow_scale(s_next))
        else:
            v = model_output.float()
            z = x
            prev = x + (s_next - s) * v
        x0 = z - s * v
        self._step_index += 1
        prev = prev.to(sample.dtype)
        x0 = x0.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return PiecewiseRectifiedFlowSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The latent at model timestep(s) ``timesteps`` (scalar or per sample) for img2img-style starts.

        VP types: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` with ``abar`` at the continuous timestep
        (log-SNR interpolation, exact at integers; the state the scheduler's own steps use at that ``t``).
        ``"flow"``: ``(1 - s) x0 + s noise`` with ``s = t / num_train_timesteps``."""
        t = torch.as_tensor(timesteps)
        t = t.reshape(-1) if t.dim() else t
        if self.is_vp:
            abar = param.vp_alphas_cumprod_at(t.cpu(), self.alphas_cumprod)
            a = param.broadcast_like(abar.sqrt(), original_samples, torch.float32)
            b = param.broadcast_like((1 - abar).sqrt(), original_samples, torch.float32)
            return (a * original_samples.float() + b * noise.float()).to(original_samples.dtype)
        s = param.broadcast_like(t.float() / self.config.num_train_timesteps, original_samples, torch.float32)
        return ((1 - s) * original_samples.float() + s * noise.float()).to(original_samples.dtype)
