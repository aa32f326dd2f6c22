import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from stepdistill.parametrization import extract, model_output_to_x0_eps
from stepdistill.solvers import DDIMSolverGrid, ddim_step, euler_flow_step, guided, lcm_guided

SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    clip_sample=False,
)


def sd_ddim_scheduler(prediction_type: str) -> DDIMScheduler:
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    scheduler.set_timesteps(50)  # step() jumps num_train_timesteps // num_inference_steps = 20
    return scheduler


def test_ddim_step_hand_value():
    out = ddim_step(torch.tensor([1.0]), torch.tensor([2.0]), 0.6, 0.8)
    torch.testing.assert_close(out, torch.tensor([2.2]))


def test_euler_flow_step_hand_value_and_matches_diffusers():
    torch.testing.assert_close(
        euler_flow_step(torch.tensor([1.0]), torch.tensor([2.0]), 0.75, 0.25), torch.tensor([0.0])
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    v = torch.randn(2, 4, 8, 8, generator=generator)
    expected = scheduler.step(v, scheduler.timesteps[0], x).prev_sample
    s, s_prev = scheduler.sigmas[0], scheduler.sigmas[1]
    assert s_prev < s
    torch.testing.assert_close(euler_flow_step(x, v, s, s_prev), expected)


def test_guidance_formulas():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    torch.testing.assert_close(guided(cond, uncond, 7.5), torch.tensor([16.0]))
    torch.testing.assert_close(guided(cond, uncond, 1.0), cond)
    torch.testing.assert_close(guided(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(lcm_guided(cond, uncond, 0.0), cond)
    torch.testing.assert_close(lcm_guided(cond, uncond, 2.0), torch.tensor([7.0]))  # (1+2)*3 - 2*1
    generator = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    w = torch.tensor([[0.0], [3.0], [14.0]])
    torch.testing.assert_close(lcm_guided(cond, uncond, w), guided(cond, uncond, 1.0 + w))


def test_grid_matches_diffusers_ddim_solver_numbers():
    alphas_cumprod = DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod
    grid = DDIMSolverGrid(alphas_cumprod, num_ddim_timesteps=50)
    assert grid.step_ratio == 20 and grid.num_train_timesteps == 1000
    assert grid.ddim_timesteps.dtype == torch.int64
    assert grid.ddim_timesteps[:3].tolist() == [19, 39, 59]
    assert grid.ddim_timesteps[-1].item() == 999 and len(grid.ddim_timesteps) == 50
    # diffusers' DDIMSolver (examples/consistency_distillation), on numpy float32 alphas_cumprod
    acp = alphas_cumprod.numpy()
    reference_timesteps = (np.arange(1, 51) * 20).round().astype(np.int64) - 1
    reference_prev = np.asarray([acp[0]] + acp[reference_timesteps[:-1]].tolist())
    np.testing.assert_array_equal(grid.ddim_timesteps.numpy(), reference_timesteps)
    np.testing.assert_array_equal(grid.ddim_alphas_cumprod.numpy(), acp[reference_timesteps])
    np.testing.assert_array_equal(grid.ddim_alphas_cumprod_prev.numpy(), reference_prev.astype(np.float32))


def test_grid_prev_timesteps_and_alphas_agree():
    alphas_cumprod = DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod
    grid = DDIMSolverGrid(alphas_cumprod)
    index = torch.arange(50)
    prev = grid.prev_timesteps(index)
    assert prev[0].item() == 0  # 19 - 20 clamped
    assert prev[1:].tolist() == grid.ddim_timesteps[:-1].tolist()
    torch.testing.assert_close(grid.ddim_alphas_cumprod_prev, alphas_cumprod[prev], rtol=0, atol=0)
    alpha_prev, sigma_prev = grid.alpha_sigma_prev(torch.tensor([0, 25]), 4)
    assert alpha_prev.shape == (2, 1, 1, 1)
    expected_alpha, expected_sigma = extract(alphas_cumprod, prev[[0, 25]], 4)
    torch.testing.assert_close((alpha_prev, sigma_prev), (expected_alpha, expected_sigma))


def test_grid_uneven_division():
    grid = DDIMSolverGrid(torch.linspace(0.999, 0.01, 1000), num_ddim_timesteps=30)
    assert grid.step_ratio == 33
    assert grid.ddim_timesteps.tolist() == [33 * n - 1 for n in range(1, 31)]
    with pytest.raises(ValueError):
        DDIMSolverGrid(torch.linspace(0.999, 0.01, 10), num_ddim_timesteps=11)


def test_sample_index_range_and_reproducibility():
    grid = DDIMSolverGrid(torch.linspace(0.999, 0.01, 1000))
    index = grid.sample_index(4096, torch.Generator().manual_seed(0))
    assert index.dtype == torch.int64 and index.shape == (4096,)
    assert index.min().item() == 0 and index.max().item() == 49
    assert torch.equal(index, grid.sample_index(4096, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_grid_step_matches_diffusers_ddim_scheduler(prediction_type):
    scheduler = sd_ddim_scheduler(prediction_type)
    grid = DDIMSolverGrid(scheduler.alphas_cumprod)
    generator = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 1, 24, 49])
    x_t = torch.randn(4, 4, 8, 8, generator=generator)
    model_output = torch.randn(4, 4, 8, 8, generator=generator)

    alpha_t, sigma_t = extract(grid.alphas_cumprod, grid.timesteps(index), x_t.ndim)
    x0_hat, eps_hat = model_output_to_x0_eps(model_output, x_t, alpha_t, sigma_t, prediction_type)
    ours = grid.step(x0_hat, eps_hat, index)

    for b, t in enumerate(grid.timesteps(index).tolist()):
        expected = scheduler.step(model_output[b : b + 1], t, x_t[b : b + 1], eta=0.0).prev_sample
        torch.testing.assert_close(ours[b : b + 1], expected, rtol=1e-5, atol=1e-5, msg=f"t={t}")
