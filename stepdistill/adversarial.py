"""Loss math of adversarial post-training (ADD, Sauer et al. 2023; LADD, Sauer et al. 2024) and of the
knowledge-distillation levers shared by every method.

GAN terms, with ``D(x)`` the discriminator's logits (one per feature position and head):

* hinge (ADD eq. 3 and its discriminator loss, used by LADD; Lim & Ye 2017)::

      L_D = E_real[max(0, 1 - D)] + E_fake[max(0, 1 + D)],      L_G = -E_fake[D]

* non-saturating (Goodfellow et al. 2014, §3; softplus(-x) = -log sigmoid(x))::

      L_D = E_real[softplus(-D)] + E_fake[softplus(D)],         L_G = E_fake[softplus(-D)]

* R1 (Mescheder et al. 2018, eq. 9): ``(gamma / 2) E_real ||grad_x D(x)||^2``. ADD penalises its discriminator
  with R1; the discriminator here is a frozen feature network (the teacher UNet) plus trainable heads, so the
  gradient is taken with respect to the heads' inputs (the frozen real features), which needs no second
  backward through the UNet.

LADD's discriminator sees the generated (and the real) latents re-noised to a teacher timestep ``t_hat``
(:func:`renoise`: ``x_t = alpha_t x0 + sigma_t eps``, the forward process, DDPM eq. 4) and reads the frozen
teacher's features there.

Knowledge-distillation levers (Hinton et al. 2015 eq. 2's alpha-mix; FitNets, Romero et al. 2015, eq. 3;
multi-teacher averaging, You et al. 2017)::

    L = L_distill + data_loss_weight * L_data + feature_loss_weight * L_feat
    L_data = E ||eps_student(x_t, t, c) - eps||^2       (the plain denoising loss on real data: the hard label)
    L_feat = mean_l  ||h_l^student - h_l^teacher||^2 / mean ||h_l^teacher||^2
    target of several teachers = sum_i w_i pred_i / sum_i w_i

Distribution matching (DMD / DMD2): :func:`distribution_matching_loss`.

Tensors in, tensors out: model calls stay with the caller.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .parametrization import extract

GAN_LOSSES = ("hinge", "nonsaturating")


def _check(kind: str):
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; expected one of {GAN_LOSSES}")


def _mean_all(logits: Sequence[torch.Tensor], fn) -> torch.Tensor:
    """Mean over heads of the mean of ``fn(logits)`` (every head weighs the same, whatever its resolution)."""
    return torch.stack([fn(x.float()).mean() for x in logits]).mean()


def discriminator_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor], kind: str = "hinge") -> torch.Tensor:
    """The discriminator's loss L_D (module docstring) over the logits of every head."""
    _check(kind)
    if kind == "hinge":
        return _mean_all(real, lambda x: F.relu(1 - x)) + _mean_all(fake, lambda x: F.relu(1 + x))
    return _mean_all(real, lambda x: F.softplus(-x)) + _mean_all(fake, F.softplus)


def generator_loss(fake: Sequence[torch.Tensor], kind: str = "hinge") -> torch.Tensor:
    """The generator's GAN term L_G (module docstring): lower when the discriminator scores the fakes as real."""
    _check(kind)
    if kind == "hinge":
        return _mean_all(fake, lambda x: -x)
    return _mean_all(fake, lambda x: F.softplus(-x))


def r1_penalty(real_logits: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """E_real ||grad D||^2 (Mescheder et al. 2018, eq. 9, without the gamma / 2): squared norm of the gradient of
    the summed real logits with respect to ``inputs`` (which must require grad), per sample, averaged.
    Differentiable (``create_graph``), so it can be added to the discriminator's loss."""
    total = sum(x.float().sum() for x in real_logits)
    grads = torch.autograd.grad(total, list(inputs), create_graph=True)
    batch = inputs[0].shape[0]
    return sum(g.float().pow(2).reshape(batch, -1).sum(1) for g in grads).mean()


def renoise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The forward process at integer ``timesteps`` (DDPM eq. 4): ``alpha_t x0 + sigma_t eps``, how LADD's
    discriminator input is made from a clean (generated or real) latent."""
    alpha, sigma = extract(alphas_cumprod.to(x0.device), timesteps.to(x0.device), x0.ndim)
    return alpha * x0 + sigma * noise.to(x0.dtype)


def x0_from_flow(x_s: torch.Tensor, velocity: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """One Euler step of the flow ODE from flow time ``s`` to 0 (``x_0 = x_s - s v``; Rectified Flow eq. 1 in
    diffusers' convention): the clean latent a one-step reflow student generates."""
    s = torch.as_tensor(s, dtype=x_s.dtype, device=x_s.device)
    s = s.reshape(-1, *([1] * (x_s.ndim - 1))) if s.ndim else s
    return x_s - s * velocity


def distribution_matching_loss(x: torch.Tensor, pred_real: torch.Tensor, pred_fake: torch.Tensor) -> torch.Tensor:
    """DMD's generator term (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation", eq. 7
    and §3.2; DMD2, Yin et al. 2024, eq. 1): the gradient of ``KL(p_fake || p_real)`` at a generated ``x`` is
    ``s_fake - s_real`` at a noised copy of ``x``; with the two score networks' x0 predictions there it is
    ``grad = (pred_fake - pred_real) / mean|x - pred_real|`` (normalised per sample), applied through the
    regression ``0.5 ||x - sg(x - grad)||^2`` whose gradient with respect to ``x`` is proportional to ``grad``:
    ``x`` moves towards the teacher's (real score's) prediction and away from the fake score's."""
    dims = list(range(1, x.ndim))
    pred_real, pred_fake = pred_real.float(), pred_fake.float()
    norm = (x.detach().float() - pred_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
    grad = torch.nan_to_num((pred_fake - pred_real) / norm)
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad).detach())


def feature_matching_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """FitNets-style hint loss (Romero et al. 2015, eq. 3, without a regressor since student and teacher share
    the architecture): per layer ``||h_s - h_t||^2`` normalised by the teacher features' mean square, averaged
    over layers, so layers of any scale weigh alike. ``teacher`` should carry no gradient."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"feature_matching_loss needs matching, non-empty feature lists ({len(student)} vs {len(teacher)})")
    terms = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        terms.append(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-8))
    return torch.stack(terms).mean()


def perceptual_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], eps: float = 1e-10) -> torch.Tensor:
    """LPIPS's distance (Zhang et al. 2018, eq. 1) with unit layer weights: per layer the features are normalised to
    unit length over channels, then ``sum_l mean_{n,h,w} ||a_hat - b_hat||^2`` (each layer lies in [0, 4]). Here the
    feature network is the frozen teacher itself (LADD's observation that a diffusion model's features are
    perceptual), so the distance lives in latent space with no pixel network."""
    if len(a) != len(b) or not a:
        raise ValueError(f"perceptual_distance needs matching, non-empty feature lists ({len(a)} vs {len(b)})")
    total = 0.0
    for x, y in zip(a, b):
        x, y = x.float(), y.float()
        x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
        y = y / (y.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
        total = total + (x - y).pow(2).sum(dim=1).mean()
    return total


def weighted_teacher_prediction(predictions: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Several teachers' (guided) predictions combined as ``sum_i w_i pred_i / sum_i w_i``."""
    if len(predictions) != len(weights) or not predictions:
        raise ValueError("weighted_teacher_prediction needs one weight per prediction")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"teacher weights must sum to a positive number, got {list(weights)}")
    return sum(p * (float(w) / total) for p, w in zip(predictions, weights))
