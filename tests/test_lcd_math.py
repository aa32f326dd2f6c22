import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, LCMScheduler

from stepdistill.lcd import (
    consistency_loss,
    consistency_output,
    lcd_target,
    pseudo_huber,
    scalings_for_boundary_conditions,
)
from stepdistill.parametrization import extract, x0_eps_to_model_output
from stepdistill.solvers import DDIMSolverGrid, lcm_guided

SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    clip_sample=False,
)


def test_boundary_scalings_hand_values():
    c_skip, c_out = scalings_for_boundary_conditions(torch.tensor([0, 1]))
    # t=0: f(x, 0) = x. t=1: tau=10, c_skip = 0.25/100.25, c_out = 10/sqrt(100.25)
    torch.testing.assert_close(c_skip, torch.tensor([1.0, 0.25 / 100.25]))
    torch.testing.assert_close(c_out, torch.tensor([0.0, 10.0 / math.sqrt(100.25)]))


@pytest.mark.parametrize("timestep_scaling", [10.0, 1.0])
def test_boundary_scalings_match_lcm_scheduler(timestep_scaling):
    scheduler = LCMScheduler(**SD_SCHEDULER_CONFIG, timestep_scaling=timestep_scaling)
    timesteps = [0, 1, 3, 19, 259, 999]
    c_skip, c_out = scalings_for_boundary_conditions(torch.tensor(timesteps), timestep_scaling=timestep_scaling)
    for i, t in enumerate(timesteps):
        expected_skip, expected_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip[i].item() == pytest.approx(expected_skip, rel=1e-6, abs=1e-12)
        assert c_out[i].item() == pytest.approx(expected_out, rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("timestep_scaling", [10.0, 0.002])  # 0.002 makes c_skip ~ 0.5 at t = 259
def test_consistency_output_matches_lcm_scheduler_denoised(prediction_type, timestep_scaling):
    scheduler = LCMScheduler(
        **SD_SCHEDULER_CONFIG, prediction_type=prediction_type, timestep_scaling=timestep_scaling
    )
    scheduler.set_timesteps(4)
    t = int(scheduler.timesteps[-1])  # last step: no noise is added, prev_sample == denoised
    assert t == 259
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, 8, 8, generator=generator)
    model_output = torch.randn(1, 4, 8, 8, generator=generator)
    expected = scheduler.step(model_output, t, x_t).denoised
    ours = consistency_output(
        x_t, model_output, torch.tensor([t]), scheduler.alphas_cumprod, prediction_type, timestep_scaling=timestep_scaling
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_consistency_output_is_identity_at_t0_and_x0_at_large_t():
    alphas_cumprod = DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    eps = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 999])
    alpha, sigma = extract(alphas_cumprod, t, 4)
    x_t = alpha * x0 + sigma * eps
    f = consistency_output(x_t, eps, t, alphas_cumprod, "epsilon")
    torch.testing.assert_close(f[0], x_t[0])  # boundary condition f(x, 0) = x
    # at t=999, c_skip ~ 2.5e-8: f is (almost exactly) the predicted x0
    torch.testing.assert_close(f[1], x0[1], rtol=1e-4, atol=1e-4)


def test_pseudo_huber_hand_values():
    a = torch.tensor([0.003, 0.0])
    b = torch.tensor([0.0, 0.0])
    # sqrt(0.003^2 + 0.004^2) - 0.004 = 0.001 and 0 for equal entries; mean = 0.0005
    torch.testing.assert_close(pseudo_huber(a, b, c=0.004), torch.tensor(0.0005))
    assert pseudo_huber(b, b).item() == 0.0
    # far from 0 it is |a - b| - c, near 0 it is (a - b)^2 / (2c)
    assert pseudo_huber(torch.tensor([5.0]), torch.tensor([0.0]), c=0.001).item() == pytest.approx(4.999, rel=1e-6)
    small = pseudo_huber(torch.tensor([1e-3], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64), c=1.0)
    assert small.dtype == torch.float64 and small.item() == pytest.approx(5e-7, rel=1e-3)
    assert pseudo_huber(torch.tensor([1.0], dtype=torch.float16), torch.tensor([0.0]), c=0.5).dtype == torch.float32


def test_consistency_loss_types():
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=generator)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    torch.testing.assert_close(consistency_loss(pred, target, "l2"), F.mse_loss(pred, target))
    expected_huber = torch.mean(torch.sqrt((pred - target) ** 2 + 0.01**2) - 0.01)
    torch.testing.assert_close(consistency_loss(pred, target, "huber", huber_c=0.01), expected_huber)
    assert consistency_loss(pred.half(), target.half(), "l2").dtype == torch.float32
    with pytest.raises(ValueError, match="l2.*huber"):
        consistency_loss(pred, target, "l1")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcd_target_matches_ddim_scheduler_on_guided_output(prediction_type):
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    scheduler.set_timesteps(50)
    grid = DDIMSolverGrid(scheduler.alphas_cumprod)
    generator = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 10, 49])
    x_t = torch.randn(3, 4, 8, 8, generator=generator)
    cond = torch.randn(3, 4, 8, 8, generator=generator)
    uncond = torch.randn(3, 4, 8, 8, generator=generator)
    w = torch.tensor([3.0, 0.0, 14.0])

    ours = lcd_target(x_t, cond, uncond, w, grid, index, prediction_type)

    # conversions are linear in the model output, so guiding (x0, eps) == guiding the raw output
    for b, t in enumerate(grid.timesteps(index).tolist()):
        guided_output = lcm_guided(cond[b : b + 1], uncond[b : b + 1], w[b])
        expected = scheduler.step(guided_output, t, x_t[b : b + 1], eta=0.0).prev_sample
        torch.testing.assert_close(ours[b : b + 1], expected, rtol=1e-4, atol=1e-4, msg=f"t={t}")


def test_lcd_target_stays_on_the_true_ddim_trajectory():
    # A teacher that knows x0 exactly: eps_hat = (x_t - alpha x0) / sigma. The DDIM step must keep that eps.
    alphas_cumprod = DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod.double()
    grid = DDIMSolverGrid(alphas_cumprod)
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    eps = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    index = torch.tensor([0, 7, 49])
    alpha, sigma = extract(alphas_cumprod, grid.timesteps(index), 4)
    x_t = alpha * x0 + sigma * eps
    v = x0_eps_to_model_output(x0, eps, alpha, sigma, "v_prediction")

    x_prev = lcd_target(x_t, v, v, 7.0, grid, index, "v_prediction")  # cond == uncond: guidance is a no-op
    alpha_prev, sigma_prev = extract(alphas_cumprod, grid.prev_timesteps(index), 4)
    torch.testing.assert_close(x_prev, alpha_prev * x0 + sigma_prev * eps)
    unguided = lcd_target(x_t, v, None, None, grid, index, "v_prediction")
    torch.testing.assert_close(unguided, x_prev)


def test_lcd_target_rejects_half_guidance():
    grid = DDIMSolverGrid(torch.linspace(0.999, 0.01, 1000))
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError):
        lcd_target(x, x, None, 3.0, grid, torch.tensor([0]), "epsilon")
    with pytest.raises(ValueError):
        lcd_target(x, x, x, None, grid, torch.tensor([0]), "epsilon")
