import math

import pytest
import torch

from stepdistill.parametrization import (
    PREDICTION_TYPES,
    append_dims,
    extract,
    flow_state_from_x0_eps,
    flow_velocity_from_x0_eps,
    model_output_to_x0_eps,
    vp_to_flow_state,
    vp_to_flow_time,
    x0_eps_from_flow,
    x0_eps_to_model_output,
)
from stepdistill.solvers import euler_flow_step


def sd_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's schedule: scaled_linear betas from 0.00085 to 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def test_append_dims_shapes_and_error():
    x = torch.arange(3.0)
    assert append_dims(x, 4).shape == (3, 1, 1, 1)
    assert append_dims(x, 1).shape == (3,)
    with pytest.raises(ValueError):
        append_dims(torch.zeros(2, 2), 1)


def test_extract_hand_values():
    alphas_cumprod = torch.tensor([0.25, 0.64, 0.36])
    alpha, sigma = extract(alphas_cumprod, torch.tensor([0, 1, 2]), 4)
    assert alpha.shape == sigma.shape == (3, 1, 1, 1)
    torch.testing.assert_close(alpha.flatten(), torch.tensor([0.5, 0.8, 0.6]))
    torch.testing.assert_close(sigma.flatten(), torch.tensor([math.sqrt(0.75), 0.6, 0.8]))


def test_extract_matches_sd_schedule_and_is_vp():
    alphas_cumprod = sd_alphas_cumprod()
    t = torch.tensor([0, 499, 999])
    alpha, sigma = extract(alphas_cumprod, t, 2)
    torch.testing.assert_close(alpha.flatten() ** 2, alphas_cumprod[t])
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))


def test_hand_computed_conversions():
    # alpha=0.6, sigma=0.8, x0=1, eps=2: x_t = 2.2, v = alpha eps - sigma x0 = 0.4
    x0, eps, x_t = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([2.2])
    alpha, sigma = 0.6, 0.8
    torch.testing.assert_close(x0_eps_to_model_output(x0, eps, alpha, sigma, "v_prediction"), torch.tensor([0.4]))
    for prediction_type, output in [("epsilon", 2.0), ("v_prediction", 0.4), ("sample", 1.0)]:
        x0_hat, eps_hat = model_output_to_x0_eps(torch.tensor([output]), x_t, alpha, sigma, prediction_type)
        torch.testing.assert_close(x0_hat, x0, msg=prediction_type)
        torch.testing.assert_close(eps_hat, eps, msg=prediction_type)


@pytest.mark.parametrize("source", PREDICTION_TYPES)
@pytest.mark.parametrize("target", PREDICTION_TYPES)
def test_round_trip_between_prediction_types(source, target):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64)
    alpha, sigma = extract(sd_alphas_cumprod().double(), torch.tensor([0, 250, 700, 999]), 4)
    x_t = alpha * x0 + sigma * eps

    source_output = x0_eps_to_model_output(x0, eps, alpha, sigma, source)
    x0_hat, eps_hat = model_output_to_x0_eps(source_output, x_t, alpha, sigma, source)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    # source -> target -> source
    target_output = x0_eps_to_model_output(x0_hat, eps_hat, alpha, sigma, target)
    x0_back, eps_back = model_output_to_x0_eps(target_output, x_t, alpha, sigma, target)
    back = x0_eps_to_model_output(x0_back, eps_back, alpha, sigma, source)
    torch.testing.assert_close(back, source_output)


def test_unknown_prediction_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="epsilon.*v_prediction.*sample"):
        model_output_to_x0_eps(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "flow")
    with pytest.raises(ValueError, match="epsilon.*v_prediction.*sample"):
        x0_eps_to_model_output(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "eps")


def test_flow_hand_values():
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    torch.testing.assert_close(vp_to_flow_time(alpha, sigma), torch.tensor(4.0 / 7.0))
    torch.testing.assert_close(vp_to_flow_state(torch.tensor(2.8), alpha, sigma), torch.tensor(2.0))
    torch.testing.assert_close(flow_velocity_from_x0_eps(torch.tensor(1.0), torch.tensor(3.0)), torch.tensor(2.0))
    x0, eps = x0_eps_from_flow(torch.tensor(2.0), torch.tensor(2.0), torch.tensor(0.5))
    torch.testing.assert_close((x0, eps), (torch.tensor(1.0), torch.tensor(3.0)))


def test_flow_one_euler_step_to_zero_recovers_x0():
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    s = append_dims(torch.tensor([1.0, 0.7, 0.2], dtype=torch.float64), 4)
    x_s = flow_state_from_x0_eps(x0, noise, s)
    v = flow_velocity_from_x0_eps(x0, noise)
    torch.testing.assert_close(euler_flow_step(x_s, v, s, 0.0), x0)
    torch.testing.assert_close(euler_flow_step(x_s, v, s, 1.0), noise)
    x0_back, noise_back = x0_eps_from_flow(x_s, v, s)
    torch.testing.assert_close(x0_back, x0)
    torch.testing.assert_close(noise_back, noise)


def test_vp_to_flow_state_lies_on_the_straight_line():
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 4, 6, 6, generator=generator, dtype=torch.float64)
    eps = torch.randn(5, 4, 6, 6, generator=generator, dtype=torch.float64)
    alpha, sigma = extract(sd_alphas_cumprod().double(), torch.tensor([0, 100, 400, 800, 999]), 4)
    x_t = alpha * x0 + sigma * eps
    s = vp_to_flow_time(alpha, sigma)
    assert torch.all((s > 0) & (s < 1))
    x_s = vp_to_flow_state(x_t, alpha, sigma)
    torch.testing.assert_close(x_s, (1 - s) * x0 + s * eps)
    # the true flow velocity at that point, one Euler step to s = 0, gives x0 back
    torch.testing.assert_close(euler_flow_step(x_s, flow_velocity_from_x0_eps(x0, eps), s, 0.0), x0)


def test_vp_to_flow_time_increases_with_t_on_sd_schedule():
    alpha, sigma = extract(sd_alphas_cumprod(), torch.arange(1000), 1)
    s = vp_to_flow_time(alpha, sigma)
    assert torch.all(s[1:] > s[:-1])
    assert 0.0 < s[0] < 0.05 and 0.9 < s[-1] < 1.0
