"""Tests for the pure reflow math (stepdistill.reflow) and the PeRFlow scheduler (stepdistill.flow_scheduler)."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from stepdistill import reflow
from stepdistill import parametrization
from stepdistill.flow_scheduler import PiecewiseRectifiedFlowScheduler

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _sched(**kw) -> PiecewiseRectifiedFlowScheduler:
    return PiecewiseRectifiedFlowScheduler(**{**SD_SCHEDULE, **kw})


def _vp_pair(abar):
    abar = torch.as_tensor(abar, dtype=torch.float64)
    return abar.sqrt(), (1 - abar).sqrt()


# ----------------------------------------------------------------------------------------------------
# (b) conventions and sign round trips


def test_straight_interpolation_endpoints_and_euler_round_trip():
    """Rectified Flow eq. 1 in the FlowMatch clock: x_1 = noise, x_0 = data, and one Euler step with
    v = noise - data from any s down to 0 recovers the data."""
    g = torch.Generator().manual_seed(0)
    noise, data = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    torch.testing.assert_close(reflow.straight_interpolation(noise, data, 1.0), noise)
    torch.testing.assert_close(reflow.straight_interpolation(noise, data, 0.0), data)
    s = torch.tensor([0.9, 0.5, 0.1])
    x_s = reflow.straight_interpolation(noise, data, s)
    v = reflow.straight_velocity(noise, data)
    torch.testing.assert_close(x_s + (0.0 - s).view(-1, 1, 1, 1) * v, data, atol=1e-6, rtol=0)
    # and Euler "up" to s=1 lands on the noise: the velocity points from data to noise
    torch.testing.assert_close(x_s + (1.0 - s).view(-1, 1, 1, 1) * v, noise, atol=1e-6, rtol=0)
    # the velocity is the s-derivative of the path (finite difference)
    h = 1e-3
    fd = (reflow.straight_interpolation(noise, data, 0.5 + h) - reflow.straight_interpolation(noise, data, 0.5 - h)) / (2 * h)
    torch.testing.assert_close(fd, v, atol=1e-3, rtol=0)


def test_rf_convention_integration_equals_flowmatch_integration():
    """Rectified Flow (t=0 noise, dZ/dt = v_RF) integrated t: 0 -> 1 equals the FlowMatch ODE
    (s = 1 - t, v = -v_RF) integrated s: 1 -> 0, for a nonlinear, time-dependent field."""
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(4, 3, generator=g)

    def v_rf(z, t):  # an arbitrary RF-convention field (data minus noise direction)
        return torch.sin(z) * (1 + t) - 0.3 * z * t**2

    ts = torch.linspace(0, 1, 17)
    z = z0.clone()
    for t, t_next in zip(ts[:-1], ts[1:]):
        z = z + (t_next - t) * v_rf(z, t)

    x = z0.clone()
    sig = reflow.rf_time_to_sigma(ts)
    assert sig[0] == 1 and sig[-1] == 0
    for s, s_next in zip(sig[:-1], sig[1:]):
        v = reflow.rf_velocity_to_flow(v_rf(x, reflow.sigma_to_rf_time(s)))
        x = x + (s_next - s) * v
    torch.testing.assert_close(x, z, atol=1e-6, rtol=0)
    # the conversions are involutions with the documented signs
    assert reflow.flow_velocity_to_rf(reflow.rf_velocity_to_flow(torch.tensor(2.0))) == 2.0
    assert reflow.rf_velocity_to_flow(torch.tensor(2.0)) == -2.0
    assert reflow.rf_time_to_sigma(0.25) == 0.75


# ----------------------------------------------------------------------------------------------------
# training-time pieces


def test_sample_flow_times_ranges_and_logit_normal_concentration():
    """Uniform times fill [sigma_min, sigma_max]; SD3's logit-normal concentrates mass in the middle."""
    g = torch.Generator().manual_seed(0)
    u = reflow.sample_flow_times(20000, g, "uniform")
    assert u.shape == (20000,) and u.dtype == torch.float32
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = reflow.sample_flow_times(20000, torch.Generator().manual_seed(0), "logit_normal")
    mid = lambda x: ((x > 0.25) & (x < 0.75)).float().mean().item()  # noqa: E731
    assert mid(ln) > 0.65 and abs(mid(u) - 0.5) < 0.02  # P(|N(0,1)| < logit(0.75)=1.0986) = 0.728
    sub = reflow.sample_flow_times(1000, torch.Generator().manual_seed(0), sigma_max=0.9, sigma_min=0.1)
    assert sub.min() >= 0.1 and sub.max() <= 0.9
    again = reflow.sample_flow_times(1000, torch.Generator().manual_seed(0), sigma_max=0.9, sigma_min=0.1)
    torch.testing.assert_close(sub, again)
    with pytest.raises(ValueError):
        reflow.sample_flow_times(4, g, "cosine")


def test_reflow_loss_mse_and_weights():
    """Rectified Flow eq. 1's squared error, batch-mean of (weighted) per-sample MSEs, with gradients."""
    v_pred = torch.zeros(2, 3, 2, 2, requires_grad=True)
    v_target = torch.stack([torch.full((3, 2, 2), 1.0), torch.full((3, 2, 2), 2.0)])
    loss = reflow.reflow_loss(v_pred, v_target)
    assert loss.item() == pytest.approx((1.0 + 4.0) / 2)
    loss.backward()
    assert v_pred.grad is not None and v_pred.grad.abs().sum() > 0
    assert reflow.reflow_loss(v_pred, v_target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
    assert reflow.reflow_loss(v_pred, v_target, torch.tensor([0.0, 2.0])).item() == pytest.approx(4.0)
    assert reflow.reflow_loss(v_target, v_target).item() == 0.0


def test_reflow_loss_pseudo_huber():
    """Lee et al. 2024's pseudo-Huber distance: sqrt(||d||^2 + c^2) - c over the whole sample, iCT's c by default;
    near L2 / 2c for small errors, near ||d|| for large ones, so every sample's gradient has about unit norm."""
    v_target = torch.stack([torch.full((3, 2, 2), 1.0), torch.full((3, 2, 2), 2.0)])  # ||d|| = sqrt(12), sqrt(48)
    v_pred = torch.zeros_like(v_target, requires_grad=True)
    c = reflow.pseudo_huber_c((3, 2, 2))
    assert c == pytest.approx(0.00054 * 12 ** 0.5)
    loss = reflow.reflow_loss(v_pred, v_target, loss_type="pseudo_huber")
    expect = ((12 + c * c) ** 0.5 - c + (48 + c * c) ** 0.5 - c) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    loss.backward()
    per_sample_grad = v_pred.grad.reshape(2, -1).norm(dim=1) * 2  # undo the batch mean
    torch.testing.assert_close(per_sample_grad, torch.ones(2), atol=1e-3, rtol=0)  # unlike L2 (grad ~ error)
    small = torch.full((1, 3, 2, 2), 1e-2)
    assert reflow.reflow_loss(small, torch.zeros_like(small), loss_type="pseudo_huber", huber_c=1.0).item() == \
        pytest.approx(12e-4 / 2, rel=1e-2)  # the quadratic regime: ||d||^2 / 2c
    assert reflow.reflow_loss(v_target, v_target, loss_type="pseudo_huber").item() == 0.0
    weighted = reflow.reflow_loss(v_pred, v_target, torch.tensor([0.0, 2.0]), loss_type="pseudo_huber")
    assert weighted.item() == pytest.approx((48 + c * c) ** 0.5 - c, rel=1e-6)
    with pytest.raises(ValueError, match="pseudo_huber"):
        reflow.reflow_loss(v_pred, v_target, loss_type="huber")


def test_window_boundaries_and_window_of():
    """PeRFlow windows: K+1 uniform boundaries from sigma_max to 0; a boundary belongs to the window it starts."""
    b = reflow.window_boundaries(4)
    torch.testing.assert_close(b, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    s = torch.tensor([1.0, 0.9, 0.75, 0.75 + 1e-8, 0.7, 0.5, 0.26, 0.25, 0.1, 0.0])
    assert reflow.window_of(s, b).tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert reflow.window_of(torch.tensor(0.3), b).item() == 2
    b2 = reflow.window_boundaries(2, sigma_max=0.8)
    torch.testing.assert_close(b2, torch.tensor([0.8, 0.4, 0.0]))
    with pytest.raises(ValueError):
        reflow.window_boundaries(0)


def test_piecewise_target_is_continuous_and_hits_the_ode_states():
    """PeRFlow's piecewise-linear target passes through the ODE states at every window boundary (so it is
    continuous in s), is straight inside each window, and its velocity jumps at the boundaries."""
    K = 4
    b = reflow.window_boundaries(K)
    g = torch.Generator().manual_seed(2)
    states = torch.randn(K + 1, 2, 3, generator=g)  # ODE states at b_0 (noise) ... b_K (data)

    def target(s):
        k = reflow.window_of(torch.tensor(s), b).item()
        return reflow.piecewise_target(states[k], states[k + 1], b[k], b[k + 1], s)

    for k in range(K + 1):
        x_at, _ = target(float(b[k]))
        torch.testing.assert_close(x_at, states[k], atol=1e-6, rtol=0)
    eps = 1e-4
    for k in range(1, K):
        above, v_above = target(float(b[k]) + eps)
        below, v_below = target(float(b[k]) - eps)
        assert (above - below).abs().max() < 10 * eps * max(v_above.abs().max(), v_below.abs().max())
        assert (v_above - v_below).abs().max() > 0.1  # different chords on either side
    # straight inside a window: the target's velocity is the finite difference of its positions
    x1, v = target(0.6)
    x2, _ = target(0.55)
    torch.testing.assert_close((x1 - x2) / 0.05, v, atol=1e-4, rtol=0)
    # one window [1, 0] from noise to data is plain reflow
    noise, data = states[0], states[-1]
    x, v = reflow.piecewise_target(noise, data, 1.0, 0.0, torch.tensor([0.3, 0.7]))
    torch.testing.assert_close(x, reflow.straight_interpolation(noise, data, torch.tensor([0.3, 0.7])))
    torch.testing.assert_close(v, reflow.straight_velocity(noise, data))
    with pytest.raises(ValueError):
        reflow.piecewise_target(noise, data, 0.2, 0.5, 0.3)


# ----------------------------------------------------------------------------------------------------
# VP <-> flow


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_velocity_from_vp_output_is_eps_minus_x0(prediction_type):
    """For x_t = alpha x0 + sigma eps, every VP parametrization maps to the flow velocity eps - x0
    (the derivative of z = x_t/(alpha+sigma) = (1-s) x0 + s eps in s)."""
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    abar = torch.tensor([0.9, 0.3, 0.02])
    a, s = (t.float().view(-1, 1, 1, 1) for t in _vp_pair(abar))
    x_t = a * x0 + s * eps
    out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
    v = parametrization.velocity_from_vp_output(out, x_t, abar, prediction_type)
    torch.testing.assert_close(v, eps - x0, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        parametrization.velocity_from_vp_output(out, x_t, abar, "flow")


def test_vp_timestep_and_flow_state_round_trip():
    """s = sigma_t/(alpha_t+sigma_t) inverts vp_timestep_for_sigma, and the flow point (s, (1-s)x0 + s eps)
    maps to the VP point (t, alpha_t x0 + sigma_t eps)."""
    ac = _sched().alphas_cumprod
    t_int = torch.tensor([0, 1, 37, 500, 998, 999])
    s = parametrization.sigma_for_vp_timestep(t_int, ac)
    a, sg = _vp_pair(ac[t_int].double())
    torch.testing.assert_close(s, sg / (a + sg))
    torch.testing.assert_close(parametrization.vp_timestep_for_sigma(s, ac), t_int.float(), atol=1e-3, rtol=0)
    assert parametrization.vp_timestep_for_sigma(s + 1e-4, ac, discrete=True).tolist() == t_int.tolist()
    assert parametrization.vp_timestep_for_sigma(s, ac, discrete=True).dtype == torch.long
    # continuous timesteps between the grid points, monotone, clamped outside the schedule
    tc = parametrization.vp_timestep_for_sigma(torch.tensor([0.0, 0.3, 0.31, 0.5, 0.99, 1.0]), ac)
    assert tc[0] == 0 and tc[-1] == 999 and tc[-2] == 999 and bool(torch.all(tc[1:] >= tc[:-1]))
    assert parametrization.vp_sigma_max(ac) == pytest.approx(0.93596, abs=1e-4)
    # state map
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    sf = torch.tensor([0.8, 0.2])
    z = reflow.straight_interpolation(eps, x0, sf)
    x_t, t = parametrization.flow_state_to_vp_input(z, sf, ac)
    abar = parametrization.vp_alphas_cumprod_at(t, ac)
    a, sg = (q.float().view(-1, 1, 1, 1) for q in _vp_pair(abar))
    torch.testing.assert_close(x_t, a * x0 + sg * eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(parametrization.vp_state_to_flow(x_t, sf), z, atol=1e-5, rtol=1e-5)
    # the continuous abar is the table at integer timesteps
    torch.testing.assert_close(parametrization.vp_alphas_cumprod_at(t_int, ac), ac[t_int].double(), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------
# (d) straightness, coupling error


def test_straightness_zero_for_lines_and_known_for_a_sine_arc():
    """Rectified Flow's S(Z) = int_0^1 ||(Z_1 - Z_0) - dZ/dt||^2 dt: 0 for a straight, constant-speed
    path (any sigma grid); for Z(u) = (u, a sin(pi u)) it is a^2 pi^2 / 2, in either time direction."""
    g = torch.Generator().manual_seed(5)
    noise, data = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sig = torch.tensor([1.0, 0.93, 0.6, 0.55, 0.2, 0.0])  # non-uniform grid
    traj = [reflow.straight_interpolation(noise, data, s) for s in sig]
    assert reflow.straightness(traj, sig) == pytest.approx(0.0, abs=1e-10)
    # a sub-interval (e.g. a VP student's [0, 0.936]) is normalized to unit time: still 0
    assert reflow.straightness(traj[1:], sig[1:]) == pytest.approx(0.0, abs=1e-10)

    a, M = 0.5, 2001
    s = torch.linspace(1, 0, M, dtype=torch.float64)
    u = 1 - s
    curve = torch.stack([u, a * torch.sin(math.pi * u)], dim=-1)[:, None, :]  # (M, B=1, 2)
    expected = a**2 * math.pi**2 / 2
    assert reflow.straightness(curve, s) == pytest.approx(expected, rel=1e-4)
    assert reflow.straightness(curve.flip(0), s.flip(0)) == pytest.approx(expected, rel=1e-4)
    assert reflow.straightness(curve, s, reduction="mean") == pytest.approx(expected / 2, rel=1e-4)
    # a constant-speed straight path traversed at non-constant speed is not straight in the paper's sense:
    # Z(u) = u^2 e gives int (1 - 2u)^2 du = 1/3
    e = torch.tensor([1.0, 0.0], dtype=torch.float64)
    quad = (u**2)[:, None, None] * e
    assert reflow.straightness(quad, s) == pytest.approx(1 / 3, rel=1e-4)


def test_coupling_error_rmse():
    """Per-sample RMSE between endpoints."""
    a = torch.zeros(2, 4, 3, 3)
    b = torch.stack([torch.full((4, 3, 3), 3.0), torch.zeros(4, 3, 3)])
    b[1, 0, 0, 0] = 6.0  # one element of 36: RMSE = sqrt(36/36)
    torch.testing.assert_close(reflow.coupling_error(b, a), torch.tensor([3.0, 1.0]))


# ----------------------------------------------------------------------------------------------------
# (a) the scheduler on an exactly straight flow


def _point_mass_eps_model(sched, x0_star):
    """The exact epsilon model of the data distribution delta(x0*): eps(x_t, t) = (x_t - alpha_t x0*)/sigma_t."""

    def model(x_t, t):
        abar = parametrization.vp_alphas_cumprod_at(t, sched.alphas_cumprod)
        a, s = (q.float() for q in _vp_pair(abar))
        return (x_t - a * x0_star) / s

    return model


def _run(sched, model, latents, num_steps):
    sched.set_timesteps(num_steps)
    x = latents * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 8])
def test_scheduler_reaches_point_mass_exactly(num_steps):
    """For deterministic data x0*, every probability-flow path is a straight line to x0* (constant
    eps - x0*), so the scheduler with the exact epsilon model lands on x0* in any number of steps."""
    g = torch.Generator().manual_seed(6)
    x0_star = torch.randn(1, 4, 4, 4, generator=g)
    sched = _sched(num_windows=4)
    model = _point_mass_eps_model(sched, x0_star)
    latents = torch.randn(2, 4, 4, 4, generator=g)
    if num_steps < 4:
        with pytest.warns(UserWarning, match="windows"):
            out = _run(sched, model, latents, num_steps)
    else:
        out = _run(sched, model, latents, num_steps)
    assert sched.sigmas[-1] == 0 and len(sched.timesteps) == num_steps
    torch.testing.assert_close(out, x0_star.expand_as(out), atol=1e-4, rtol=0)


def test_scheduler_matches_ddim_and_curved_flows_need_more_steps():
    """An Euler step in flow coordinates is a DDIM step; for two-point data the flow is curved, so one
    step is worse than eight (the error a reflow student removes)."""
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(7)
    centers = torch.stack([torch.full((4, 2, 2), 1.5), torch.full((4, 2, 2), -1.5)])
    sched = _sched(num_windows=1)

    def model(x_t, t):  # exact eps for the mixture 1/2 delta(c0) + 1/2 delta(c1)
        abar = parametrization.vp_alphas_cumprod_at(t, sched.alphas_cumprod)
        a, s = (q.float() for q in _vp_pair(abar))
        d2 = torch.stack([((x_t - a * c) ** 2).flatten(1).sum(1) for c in centers], 1)
        w = torch.softmax(-d2 / (2 * s**2), dim=1)
        x0 = torch.einsum("bk,kchw->bchw", w, centers)
        return (x_t - a * x0) / s

    x_T = torch.randn(6, 4, 2, 2, generator=g)
    nearest = torch.where(x_T.flatten(1).mean(1, keepdim=True).view(-1, 1, 1, 1) > 0, centers[0], centers[1])
    err = {n: (_run(sched, model, x_T, n) - nearest).abs().max().item() for n in (1, 8)}
    assert err[8] < 0.5 * err[1]

    # diffusers' DDIM (eta=0) between the same integer timesteps 999 -> 499 takes the same step
    ddim = DDIMScheduler(**SD_SCHEDULE, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    ddim.set_timesteps(2)
    assert ddim.timesteps.tolist() == [999, 499]
    sched.set_timesteps(timesteps=[999, 499])
    torch.testing.assert_close(sched.timesteps, torch.tensor([999.0, 499.0]), atol=1e-3, rtol=0)
    eps = model(x_T, sched.timesteps[0])
    ours = sched.step(eps, sched.timesteps[0], x_T)
    ref = ddim.step(eps, 999, x_T, eta=0.0)
    torch.testing.assert_close(ours.prev_sample, ref.prev_sample, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.pred_original_sample, ref.pred_original_sample, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# step placement, add_noise, FlowMatch agreement


def test_set_timesteps_places_steps_on_window_boundaries():
    """Every window boundary is a step point when N >= K; extra steps go to the noisiest windows."""
    sched = _sched(num_windows=4)
    wb = sched.window_sigmas
    assert wb[0] == pytest.approx(parametrization.vp_sigma_max(sched.alphas_cumprod)) and wb[-1] == 0
    for n in (4, 6, 8, 9):
        sched.set_timesteps(n)
        assert len(sched.sigmas) == n + 1 and len(sched.timesteps) == n
        assert sched.timesteps.dtype == torch.float32
        assert bool(torch.all(sched.sigmas[1:] < sched.sigmas[:-1]))
        for boundary in wb:
            assert (sched.sigmas - boundary).abs().min() < 1e-6
        # the timesteps are where the VP model must be queried: their flow time is the step's sigma
        s_of_t = parametrization.sigma_for_vp_timestep(sched.timesteps, sched.alphas_cumprod).float()
        torch.testing.assert_close(s_of_t, sched.sigmas[:-1], atol=1e-5, rtol=0)
    sched.set_timesteps(6)  # 2 + 2 + 1 + 1 steps per window
    counts = torch.bincount(reflow.window_of(sched.sigmas[:-1], wb), minlength=4).tolist()
    assert counts == [2, 2, 1, 1]
    assert sched.timesteps[0] == 999


def test_add_noise_lands_on_the_flow_path():
    """add_noise at a schedule timestep gives the VP state whose flow rescaling is (1-s) x0 + s noise."""
    g = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    sched = _sched(num_windows=2)
    sched.set_timesteps(4)
    for i in range(4):
        x_t = sched.add_noise(x0, noise, sched.timesteps[i : i + 1].repeat(2))
        z = parametrization.vp_state_to_flow(x_t, sched.sigmas[i])
        torch.testing.assert_close(z, reflow.straight_interpolation(noise, x0, sched.sigmas[i]), atol=1e-5, rtol=1e-5)
    # integer timesteps use the training table exactly (as DDPM's add_noise)
    ac = sched.alphas_cumprod
    torch.testing.assert_close(
        sched.add_noise(x0, noise, torch.tensor([10, 700])),
        ac[[10, 700]].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ac[[10, 700]]).sqrt().view(-1, 1, 1, 1) * noise,
    )
    flow = _sched(prediction_type="flow")
    torch.testing.assert_close(flow.add_noise(x0, noise, torch.tensor(250.0)), 0.75 * x0 + 0.25 * noise)


def test_flow_prediction_matches_flowmatch_euler():
    """prediction_type="flow": timesteps and Euler steps equal diffusers' FlowMatchEulerDiscreteScheduler
    on the same sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours = _sched(prediction_type="flow", num_windows=3)
    assert ours.init_noise_sigma == 1.0 and ours.sigma_max == 1.0
    ours.set_timesteps(6)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    ref.set_timesteps(sigmas=ours.sigmas[:-1].numpy())
    torch.testing.assert_close(ref.sigmas, ours.sigmas)
    torch.testing.assert_close(ref.timesteps, ours.timesteps)
    g = torch.Generator().manual_seed(9)
    x = y = x_init = torch.randn(2, 4, 3, 3, generator=g)
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        v = torch.sin(3 * x) + 0.1 * t_ours / 1000  # any velocity field
        x = ours.step(v, t_ours, x).prev_sample
        y = ref.step(v, t_ref, y).prev_sample
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert (x - x_init).abs().max() > 0.1  # the steps did move the sample


def test_scheduler_config_and_validation():
    """Config round trip (from an SD scheduler config), and the documented errors."""
    from stepdistill.toy.models import SD_SCHEDULER_CONFIG

    sched = PiecewiseRectifiedFlowScheduler.from_config(SD_SCHEDULER_CONFIG, num_windows=2)
    assert sched.config.num_windows == 2 and sched.config.prediction_type == "epsilon"
    torch.testing.assert_close(sched.alphas_cumprod, _sched().alphas_cumprod)
    again = PiecewiseRectifiedFlowScheduler.from_config(sched.config)
    assert again.config.num_windows == 2 and again.sigma_max == sched.sigma_max
    with pytest.raises(ValueError):
        _sched(sigma_max=1.0)  # epsilon model at s=1 is undefined
    with pytest.raises(ValueError):
        _sched(prediction_type="x0")
    with pytest.raises(ValueError):
        sched.step(torch.zeros(1), torch.tensor(999.0), torch.zeros(1))  # before set_timesteps


# ----------------------------------------------------------------------------------------------------
# (c) inside a stock StableDiffusionPipeline


@pytest.fixture(scope="module")
def tiny_sd_parts():
    from stepdistill.toy.models import build_text_encoder, build_unet, build_vae
    from stepdistill.toy.tokenizer import build_toy_tokenizer

    torch.manual_seed(0)
    tok = build_toy_tokenizer()
    te = build_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    return dict(vae=build_vae().eval(), text_encoder=te.eval(), tokenizer=tok, unet=build_unet().eval())


def test_scheduler_in_stock_sd_pipelines(tiny_sd_parts):
    """pipe.scheduler = PiecewiseRectifiedFlowScheduler(...) works in StableDiffusionPipeline (1, 2, 4 steps)
    and StableDiffusionImg2ImgPipeline (add_noise + set_begin_index); the UNet is queried at exactly the
    scheduler's timesteps."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    sched = _sched(num_windows=2)
    pipe = StableDiffusionPipeline(
        **tiny_sd_parts, scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    for n in (1, 2, 4):
        seen = []

        def cb(p, i, t, kw):
            seen.append(float(t))
            return kw

        with pytest.warns(UserWarning, match="windows") if n < 2 else contextlib.nullcontext():
            out = pipe(
                "a red circle", num_inference_steps=n, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0), callback_on_step_end=cb,
            ).images
        assert out.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(out)).all())
        assert seen == pipe.scheduler.timesteps.tolist() and len(seen) == n
        assert pipe.scheduler.step_index == n

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    seen = []
    image = torch.rand(1, 3, 64, 64)  # in [0, 1]
    out = img2img(
        "a red circle", image=image, strength=0.5, num_inference_steps=4, guidance_scale=1.0, output_type="np",
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=lambda p, i, t, kw: (seen.append(float(t)), kw)[1],
    ).images
    assert out.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(out)).all())
    assert seen == img2img.scheduler.timesteps[2:].tolist()
    assert img2img.scheduler.step_index == 4

