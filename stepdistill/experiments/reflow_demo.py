"""The reflow part of ``stepdistill demo``: teacher couplings on toy prompts, reflow LoRA training, and
evaluation at 8/4/2/1 steps with ``PiecewiseRectifiedFlowScheduler``, plus the straightness (Rectified Flow,
Sec. 2.3) of the student's and the teacher's trajectories under the same flow sampler."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import parametrization, reflow
from ..eval import metrics
from ..flow_scheduler import PiecewiseRectifiedFlowScheduler
from ..methods.reflow_couplings import generate_couplings
from ..models.latents import latent_shape, seeded_noise
from ..models.pipeline import load_pipeline
from ..sampling import generate, load_loras_into_pipeline
from ..toy.world import TOY_GUIDANCE, evaluation_prompts, toy_recipe
from ..training.config import load_config
from ..training.loop import train

TOY_COUPLINGS = dict(n=2048, num_steps=24, solver="ddim", windows=1, seed=1)


def flow_scheduler(pipe, num_windows: int):
    pipe.scheduler = PiecewiseRectifiedFlowScheduler.from_config(pipe.scheduler.config, num_windows=num_windows)


@torch.no_grad()
def trajectory_straightness(pipe, prompts, steps: int, guidance: float, seed: int = 0) -> float:
    """Straightness of the sampler's path in flow coordinates (0 = straight at constant speed)."""
    states = []

    def record(p, i, t, kwargs):
        states.append(kwargs["latents"].detach().clone())
        return kwargs

    noise = seeded_noise(range(len(prompts)), seed, latent_shape(pipe))
    pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(), output_type="latent",
         callback_on_step_end=record)
    sched = pipe.scheduler
    sigmas = sched.sigmas.cpu().double()  # flow times of the initial state and after each step (ends at 0)
    vp = [noise] + states  # VP states x_t -> flow states z = n(s) x_t
    flow = [parametrization.vp_state_to_flow(x.double(), s) for x, s in zip(vp, sigmas)]
    return reflow.straightness(flow, sigmas[:len(flow)])


def evaluate_flow(pipe, prompts, num_windows: int, step_counts=(8, 4, 2, 1), guidance: float = 1.0, seed: int = 0,
                  straightness_prompts: int = 32):
    """A pipeline under the flow sampler (``num_windows`` windows) at each step count: ``(cells, rows)``, each cell
    with the toy metrics, ``sec_per_image`` and the ``straightness`` of its 8-step trajectories on the first
    ``straightness_prompts`` prompts."""
    flow_scheduler(pipe, num_windows)
    cells, rows = {}, {}
    for steps in step_counts:
        images, sec = generate(pipe, prompts, steps=steps, guidance=guidance, seed=seed)
        cells[str(steps)] = {**metrics.toy_metrics(images, prompts), "sec_per_image": sec}
        rows[steps] = images
    s = trajectory_straightness(pipe, prompts[:straightness_prompts], 8, guidance, seed)
    for cell in cells.values():
        cell["straightness"] = s
    return cells, rows


def run_reflow_demo(out: Path, prompts, device=None, seed: int = 0, num_couplings: int | None = None,
                    **recipe_overrides):
    """Couplings, reflow training (the packaged toy recipe ``configs/toy-reflow.yaml`` + ``recipe_overrides``) and
    the 8/4/2/1-step cells.

    Returns ``(cells, rows, baseline, baseline_rows)``: ``cells[str(steps)]`` holds the toy metrics,
    ``sec_per_image`` and ``straightness`` (the student's 8-step trajectories under the flow sampler, paper
    definition: squared norm summed over the latent); ``cells["teacher_straightness"]`` is the same measure for
    the base model at the student's guidance (1), ``teacher_straightness_cfg`` at the teacher's CFG scale;
    ``baseline`` holds the base model's cells under the student's sampler and guidance."""
    teacher = load_pipeline("toy", device=device)
    c = TOY_COUPLINGS
    t0 = time.perf_counter()
    result = generate_couplings(teacher, evaluation_prompts(num_couplings or c["n"], seed=c["seed"]), out / "couplings",
                                num_steps=c["num_steps"], solver=c["solver"], guidance_scale=TOY_GUIDANCE,
                                num_windows=c["windows"], seed=c["seed"] * 100_000, model_id="toy")
    couple_seconds = time.perf_counter() - t0
    config = load_config(toy_recipe("reflow"), output_dir=str(out / "lora-reflow"), overwrite=True,
                         couplings_dir=str(out / "couplings"), **recipe_overrides)
    t0 = time.perf_counter()
    lora_dir = train(config)
    train_seconds = time.perf_counter() - t0

    K = config.reflow_windows
    # the honest baseline: the base model, no adapter, under the student's sampler and guidance; straightness is
    # compared at that equal guidance (the guided teacher's is kept for reference)
    baseline, base_rows = evaluate_flow(teacher, prompts, K, seed=seed)
    teacher_straightness = baseline["8"]["straightness"]
    teacher_straightness_cfg = trajectory_straightness(teacher, prompts[:32], 8, TOY_GUIDANCE, seed)
    student = load_pipeline("toy", device=device)
    load_loras_into_pipeline(student, [(str(lora_dir), 1.0)])
    cells, rows = evaluate_flow(student, prompts, K, seed=seed)
    cells.update(teacher_straightness=teacher_straightness, teacher_straightness_cfg=teacher_straightness_cfg,
                 couplings=result.num_generated,
                 couplings_per_second=result.couplings_per_second, couple_seconds=couple_seconds,
                 train_seconds=train_seconds)
    return cells, rows, baseline, base_rows
