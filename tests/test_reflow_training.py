"""The reflow objective (stepdistill.reflow_objective) in the training loop: a few steps on a tiny random SD pipeline
write a LoRA, resume is exact, the targets are PeRFlow's segments, and on a teacher whose couplings are exactly
straight the trained target, the student-velocity conversion and the student scheduler agree (sign round trip)."""
from __future__ import annotations

import contextlib
import json
import types

import pytest
import torch

from stepdistill.methods import reflow_couplings as RC
from stepdistill.cli import reflow as cli_reflow
from stepdistill.data import couplings as couplings_io
from stepdistill import lora, reflow
from stepdistill import parametrization
from stepdistill.errors import ConfigError
from stepdistill.training.config import load_config
from stepdistill.flow_scheduler import PiecewiseRectifiedFlowScheduler
from stepdistill.methods.base import collate_rows
from stepdistill.methods.reflow import ReflowObjective
from stepdistill.models.denoiser import model_velocity as student_velocity
from stepdistill.reflow import native_loss_weight
from stepdistill.training.heldout import heldout_batches, heldout_loss
from stepdistill.training.loop import lora_target_modules, train
from tiny_models import PROMPTS, PointMassUNet, point_mass_pipe

ACCEL = types.SimpleNamespace(device=torch.device("cpu"), main_process_first=contextlib.nullcontext)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small kernels: see tests/conftest.py


def _config(model, couplings, out, **kw):
    base = dict(method="reflow", pretrained_model=model, couplings_dir=couplings, output_dir=str(out),
                reflow_windows=2, lora_rank=4, train_batch_size=4, max_train_steps=3, checkpointing_steps=0,
                learning_rate=1e-3, validation_steps=0, report_to="none")
    base.update(kw)
    return load_config(None, **base)


def test_reflow_training_writes_a_lora_with_its_card(tiny_setup, tmp_path):
    model, couplings = tiny_setup
    out = train(_config(model, couplings, tmp_path / "run", validation_prompts=["a red circle"],
                        validation_step_counts=[2]))
    file = out / "pytorch_lora_weights.safetensors"
    sd, metadata, fmt = lora.read_lora(file)
    assert fmt == "kohya" and len(sd) > 50 and all(torch.isfinite(v).all() for v in sd.values())
    assert metadata["stepdistill.method"] == "reflow" and metadata["stepdistill.num_windows"] == "2"
    card = json.loads((out / "stepdistill_card.json").read_text())
    assert card["scheduler"] == "PiecewiseRectifiedFlowScheduler" and card["num_windows"] == 2
    assert card["recommended_steps"] == 2 and card["recommended_guidance"] == 1.0
    assert card["coupling_guidance"] == 3.0 and card["num_couplings"] == 5
    assert (out / "validation" / "step-000003.png").exists()  # sampled with the PeRFlow scheduler, guidance 1
    assert not (out / "cache").exists()  # reflow builds no image cache


def test_heldout_batches_spread_over_the_set():
    assert [b.tolist() for b in heldout_batches(10, 2, 2)] == [[0, 3], [6, 9]]
    assert [b.tolist() for b in heldout_batches(3, 2, 8)] == [[0, 1], [2]]  # a small set: each row once
    assert [b.tolist() for b in heldout_batches(1, 4, 2)] == [[0]]


def test_heldout_loss_is_logged_and_does_not_touch_training(tiny_setup, tiny_random_pipe, tmp_path):
    """``validation_couplings_dir``: the regression loss on couplings the run never sees is logged to TensorBoard
    every validation_steps and at the end, the last value goes into the card and equals the loss of the saved
    adapter on those couplings, and the adapter is bit-identical to a run that measures nothing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, couplings = tiny_setup
    heldout = tmp_path / "heldout"
    RC.generate_couplings(tiny_random_pipe, PROMPTS[::-1], heldout, num_steps=4, num_windows=2, guidance_scale=3.0,
                          seed=777, model_id=model, progress=False)
    kw = dict(max_train_steps=5, train_batch_size=2, validation_batches=2)
    out = train(_config(model, couplings, tmp_path / "measured", validation_couplings_dir=str(heldout),
                        validation_steps=2, report_to="tensorboard", **kw))
    plain = train(_config(model, couplings, tmp_path / "plain", **kw))
    a, _, _ = lora.read_lora(out / "pytorch_lora_weights.safetensors")
    b, _, _ = lora.read_lora(plain / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("heldout_loss")}
    assert sorted(logged) == [2, 4, 5]  # every 2 steps and at the end
    assert len(set(logged.values())) == 3  # it follows the adapter
    card = json.loads((out / "stepdistill_card.json").read_text())
    assert card["heldout_loss"] == pytest.approx(logged[5], rel=1e-5)
    # recompute it from the saved adapter on a fresh copy of the model
    cfg = _config(model, couplings, "unused", validation_couplings_dir=str(heldout), **kw)
    pipe = type(tiny_random_pipe).from_pretrained(model)
    lora.add_lora_to_unet(pipe.unet, rank=cfg.lora_rank, alpha=cfg.lora_rank,
                          target_modules=lora_target_modules(cfg, pipe.unet))
    lora.init_adapter_from_file(pipe.unet, out / "pytorch_lora_weights.safetensors")
    obj = ReflowObjective(cfg, pipe, ACCEL)
    accel = types.SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    again = heldout_loss(accel, pipe.unet, obj, cfg)
    assert again == pytest.approx(card["heldout_loss"], rel=1e-4) and again > 0
    # couplings made with other settings, and a method that trains on none, are refused in one line
    other = tmp_path / "other-windows"
    RC.generate_couplings(tiny_random_pipe, PROMPTS[:2], other, num_steps=4, num_windows=1, guidance_scale=3.0,
                          seed=5, model_id=model, progress=False)
    with pytest.raises(ConfigError, match="validation_couplings_dir=.* was made with other windows"):
        ReflowObjective(_config(model, couplings, "unused", validation_couplings_dir=str(other)), pipe, ACCEL)
    with pytest.raises(ConfigError, match="validation_couplings_dir measures a held-out loss"):
        load_config(None, method="lcd", validation_couplings_dir=str(heldout))


def test_perceptual_term_compares_teacher_features_of_the_one_step_sample(tiny_setup, tiny_random_pipe, tmp_path):
    """``perceptual_loss_weight``: the term is 0 when the student's one-step sample is the coupling's data, grows
    with the gap, sends no gradient into the base weights, adds to the regression with its weight, and a run with
    it writes an adapter whose card names it."""
    from stepdistill import adversarial

    model, couplings = tiny_setup
    K1 = tmp_path / "k1"
    RC.generate_couplings(tiny_random_pipe, PROMPTS, K1, num_steps=2, num_windows=1, guidance_scale=3.0,
                          model_id=model, progress=False)
    cfg = _config(model, str(K1), "unused", reflow_windows=1, reflow_time_distribution="noise",
                  perceptual_loss_weight=2.0, perceptual_layers=["down_blocks.0", "mid_block"])
    obj = ReflowObjective(cfg, tiny_random_pipe, ACCEL)
    lora.add_lora_to_unet(tiny_random_pipe.unet, rank=4, alpha=4, target_modules=lora_target_modules(cfg,
                                                                                                       tiny_random_pipe.unet))
    unet = tiny_random_pipe.unet
    batch = collate_rows(obj.dataset, torch.arange(4))
    x0 = batch["states"][:, -1].float()
    cond = batch["cond"]
    assert float(obj.perceptual_loss(unet, x0, x0, cond, torch.Generator().manual_seed(0))) < 1e-8
    near = obj.perceptual_loss(unet, x0 + 0.05 * torch.randn_like(x0), x0, cond, torch.Generator().manual_seed(0))
    far = obj.perceptual_loss(unet, x0 + 1.0 * torch.randn_like(x0), x0, cond, torch.Generator().manual_seed(0))
    assert 0 < float(near) < float(far)
    pred = (x0 + torch.randn_like(x0)).requires_grad_(True)
    obj.perceptual_loss(unet, pred, x0, cond, torch.Generator().manual_seed(0)).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora" not in n)
    total, logs = obj.loss(unet, unet, batch, torch.Generator().manual_seed(1))
    assert float(total.detach()) == pytest.approx(logs["regression"] + 2.0 * logs["perceptual"], rel=1e-5)
    assert adversarial.perceptual_distance([torch.ones(1, 3, 2, 2)], [-torch.ones(1, 3, 2, 2)]).item() == \
        pytest.approx(4.0)  # opposite unit vectors
    out = train(_config(model, str(K1), tmp_path / "run", reflow_windows=1, reflow_time_distribution="noise",
                        perceptual_loss_weight=1.0, max_train_steps=2))
    card = json.loads((out / "stepdistill_card.json").read_text())
    assert card["perceptual_loss_weight"] == 1.0 and card["perceptual_layers"] == "down_blocks.0,down_blocks.1,mid_block"
    with pytest.raises(ConfigError, match="needs reflow_windows=1"):
        _config(model, couplings, "unused", perceptual_loss_weight=1.0)
    with pytest.raises(ConfigError, match="layer 'mid_blok' is not in"):
        ReflowObjective(_config(model, str(K1), "unused", reflow_windows=1, perceptual_loss_weight=1.0,
                                perceptual_layers=["mid_blok"]), tiny_random_pipe, ACCEL)


def test_reflow_resume_is_exact(tiny_setup, tmp_path):
    from resume_check import check_resume_is_exact

    model, couplings = tiny_setup
    check_resume_is_exact(lambda out, **kw: _config(model, couplings, out, **kw), tmp_path)


def test_lora_dropout_changes_training_measures_without_it_and_resumes_exactly(tiny_setup, tmp_path):
    """``lora_dropout``: peft's dropout on each LoRA branch's input. A run with it trains another adapter than one
    without; its held-out loss is measured without dropout (it equals the saved adapter's loss, recomputed on a
    fresh model); and it resumes exactly (the masks come from the RNG state the checkpoint restores)."""
    from resume_check import check_resume_is_exact

    from stepdistill.lora.peft_adapter import lora_modules
    from stepdistill.models.pipeline import load_pipeline

    model, couplings = tiny_setup
    unet = load_pipeline(model).unet
    lora.add_lora_to_unet(unet, rank=2, dropout=0.25)
    drops = [m.lora_dropout["default"] for m in lora_modules(unet, "default").values()]
    assert drops and all(isinstance(d, torch.nn.Dropout) and d.p == 0.25 for d in drops)

    kw = dict(max_train_steps=4, validation_couplings_dir=couplings, validation_batches=2)
    out = train(_config(model, couplings, tmp_path / "drop", lora_dropout=0.5, **kw))
    plain = train(_config(model, couplings, tmp_path / "plain", **kw))
    a, _, _ = lora.read_lora(out / "pytorch_lora_weights.safetensors")
    b, _, _ = lora.read_lora(plain / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    card = json.loads((out / "stepdistill_card.json").read_text())
    cfg = _config(model, couplings, "unused", **kw)
    pipe = load_pipeline(model)
    lora.add_lora_to_unet(pipe.unet, rank=cfg.lora_rank, alpha=cfg.lora_rank,
                          target_modules=lora_target_modules(cfg, pipe.unet))
    lora.init_adapter_from_file(pipe.unet, out / "pytorch_lora_weights.safetensors")
    accel = types.SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1,
                                  main_process_first=contextlib.nullcontext)
    again = heldout_loss(accel, pipe.unet.eval(), ReflowObjective(cfg, pipe, accel), cfg)
    assert again == pytest.approx(card["heldout_loss"], rel=1e-4) and again > 0
    with pytest.raises(ConfigError, match=r"lora_dropout must be in \[0, 1\)"):
        _config(model, couplings, "unused", lora_dropout=1.0)
    check_resume_is_exact(lambda o, **k: _config(model, couplings, o, lora_dropout=0.5, **k), tmp_path / "resume")


def test_targets_are_the_piecewise_segments_and_windows_subsample(tiny_setup, tiny_random_pipe):
    model, couplings = tiny_setup
    cs = couplings_io.load_couplings(couplings)
    obj = ReflowObjective(_config(model, couplings, "unused"), tiny_random_pipe, ACCEL)
    assert obj.stride == 1 and torch.allclose(obj.boundaries, reflow.window_boundaries(2, obj.sigma_max))
    idx = torch.randint(0, len(cs), (64,), generator=torch.Generator().manual_seed(5))
    s, x_s, v = obj.targets(collate_rows(obj.dataset, idx), torch.Generator().manual_seed(0))
    assert 0 <= float(s.min()) and float(s.max()) <= obj.sigma_max
    b = cs.sigma_boundaries.float()
    st = cs.boundary_states(idx)
    k = (s <= b[1]).long()  # window 0 is (b1, b0], window 1 is [0, b1]
    assert set(k.tolist()) == {0, 1}
    for i in range(64):
        z0, z1, s0, s1 = st[i, k[i]], st[i, k[i] + 1], b[k[i]], b[k[i] + 1]
        torch.testing.assert_close(v[i], (z0 - z1) / (s0 - s1), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(x_s[i], z1 + (s[i] - s1) * (z0 - z1) / (s0 - s1), atol=1e-4, rtol=1e-5)
    # K=1 on K=2 couplings: the chord noise -> data
    one = ReflowObjective(_config(model, couplings, "unused", reflow_windows=1), tiny_random_pipe, ACCEL)
    idx = torch.arange(8) % len(cs)
    s, x_s, v = one.targets(collate_rows(one.dataset, idx), torch.Generator().manual_seed(1))
    st = cs.boundary_states(idx)
    torch.testing.assert_close(v, (st[:, 0] - st[:, 2]) / obj.sigma_max, atol=1e-4, rtol=1e-5)
    with pytest.raises(ConfigError, match="must divide"):
        ReflowObjective(_config(model, couplings, "unused", reflow_windows=3), tiny_random_pipe, ACCEL)
    with pytest.raises(ConfigError, match="couplings_dir"):
        ReflowObjective(_config(model, None, "unused"), tiny_random_pipe, ACCEL)


def test_reflow_loss_type_reaches_the_objective(tiny_setup, tiny_random_pipe):
    """``reflow_loss_type: pseudo_huber`` changes the objective's loss to Lee et al.'s distance on the same targets
    and prediction; the card records it; a bad type or c is a one-line config error."""
    model, couplings = tiny_setup
    batch = collate_rows(couplings_io.load_couplings(couplings), torch.arange(4))
    losses = {}
    for kind in ("l2", "pseudo_huber"):
        obj = ReflowObjective(_config(model, couplings, "unused", reflow_loss_type=kind), tiny_random_pipe, ACCEL)
        losses[kind] = float(obj.loss(tiny_random_pipe.unet, tiny_random_pipe.unet, batch,
                                      torch.Generator().manual_seed(3))[0])
        assert obj.card(obj.config)["loss_type"] == kind
    s, x_s, v = obj.targets(batch, torch.Generator().manual_seed(3))
    v_pred = student_velocity(tiny_random_pipe.unet, x_s, s, batch["cond"], prediction_type=obj.prediction_type,
                              alphas_cumprod=obj.alphas_cumprod)
    assert losses["l2"] == pytest.approx(float(reflow.reflow_loss(v_pred, v)), rel=1e-5)
    assert losses["pseudo_huber"] == pytest.approx(float(reflow.reflow_loss(v_pred, v, loss_type="pseudo_huber")),
                                                   rel=1e-5)
    assert losses["l2"] != pytest.approx(losses["pseudo_huber"], rel=1e-2)
    with pytest.raises(ConfigError, match="reflow_loss_type must be one of"):
        _config(model, couplings, "unused", reflow_loss_type="huber")
    with pytest.raises(ConfigError, match="reflow_huber_c must be > 0"):
        _config(model, couplings, "unused", reflow_loss_type="pseudo_huber", reflow_huber_c=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("windows", [1, 2])
def test_straight_teacher_sign_round_trip(tiny_random_pipe, tmp_path, prediction_type, windows):
    """Point-mass teacher: its couplings are exactly straight, so (a) the teacher itself, read through the
    objective's output->velocity conversion, has zero reflow loss (a flipped sign would not), (b) one Euler step of
    the trained target from the noise lands on the data and (c) PiecewiseRectifiedFlowScheduler, stepping with
    the teacher's native output, lands on it in one step too."""
    pipe, c = point_mass_pipe(tiny_random_pipe, prediction_type)
    RC.generate_couplings(pipe, PROMPTS[:4], tmp_path, num_steps=2, num_windows=2, guidance_scale=4.0,
                         progress=False)
    cfg = load_config(None, method="reflow", couplings_dir=str(tmp_path), reflow_windows=windows)
    obj = ReflowObjective(cfg, pipe, ACCEL)
    gen = torch.Generator().manual_seed(6)
    idx = torch.arange(16) % len(obj.dataset)
    batch = collate_rows(obj.dataset, idx)
    loss, _ = obj.loss(pipe.unet, pipe.unet, batch, gen)
    s, x_s, v = obj.targets(batch, torch.Generator().manual_seed(6))
    assert float(s.min()) > 0.1  # eps/v -> velocity loses fp32 digits as s -> 0 (measured: 0.07 MSE at s = 0.02)
    scale = float((v**2).mean())
    assert float(loss) < 1e-6 * scale
    v_student = student_velocity(pipe.unet, x_s, s, batch["cond"], prediction_type=prediction_type,
                                 alphas_cumprod=obj.alphas_cumprod)
    torch.testing.assert_close(v_student, v, atol=1e-3 * scale**0.5, rtol=1e-4)
    assert float(reflow.reflow_loss(-v_student, v)) > scale  # the sign matters
    # (b) Euler with the target velocity across the sample's window lands on the window's end state, and the
    # couplings end on the teacher's data
    cs = couplings_io.load_couplings(tmp_path)
    st, b = cs.boundary_states(idx), obj.boundaries
    k = reflow.window_of(s, b) if windows > 1 else torch.zeros(16, dtype=torch.long)
    ar = torch.arange(16)
    end = st[ar, k * obj.stride] - (b[k] - b[k + 1]).reshape(-1, 1, 1, 1) * v
    torch.testing.assert_close(end, st[ar, (k + 1) * obj.stride], atol=1e-4, rtol=0)
    torch.testing.assert_close(cs.tensor("data"), c.expand(4, -1, -1, -1), atol=1e-4, rtol=0)
    # (c) the student scheduler, 1 step from the pipeline's initial latent (the stored noise)
    sched = PiecewiseRectifiedFlowScheduler.from_config(pipe.scheduler.config, **obj.scheduler_spec()[2])
    with pytest.warns(UserWarning) if windows > 1 else contextlib.nullcontext():
        sched.set_timesteps(1)
    noise = cs.tensor("noise")
    t = sched.timesteps[0]
    x = sched.step(pipe.unet(noise, t.expand(len(noise))).sample, t, noise).prev_sample
    torch.testing.assert_close(x, c.expand_as(x), atol=1e-3, rtol=0)


def test_native_weighting_equals_mse_in_output_space():
    """w(s) * |dv|^2 == |d out|^2 for the affine output->velocity maps of every VP parametrization."""
    g = torch.Generator().manual_seed(0)
    x_t, out_a, out_b = (torch.randn(5, 3, generator=g) for _ in range(3))
    s = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.93])
    abar = (1 - s) ** 2 / ((1 - s) ** 2 + s**2)
    for pt in ("epsilon", "v_prediction", "sample"):
        dv = parametrization.velocity_from_vp_output(out_a, x_t, abar, pt) - parametrization.velocity_from_vp_output(out_b, x_t, abar, pt)
        torch.testing.assert_close(native_loss_weight(s, pt) * (dv**2).sum(1), ((out_a - out_b) ** 2).sum(1),
                                   rtol=1e-4, atol=1e-6)


class PointMassFlow(torch.nn.Module):
    """A FlowMatch transformer whose data distribution is a point mass at ``c``: ``v = (z - c) / s``."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("c", c)
        self.config = types.SimpleNamespace(in_channels=c.shape[0], sample_size=c.shape[-1])

    @property
    def dtype(self):
        return torch.float32

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, pooled_projections=None, return_dict=True):
        assert encoder_hidden_states is not None and pooled_projections is not None
        s = (torch.as_tensor(timestep, dtype=torch.float32) / 1000).reshape(-1, 1, 1, 1)
        return ((hidden_states - self.c) / s,)


def test_flow_teacher_objective_and_scheduler_round_trip(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    c = torch.randn(16, 4, 4, generator=torch.Generator().manual_seed(3))

    def encode_prompt(prompt, prompt_2=None, prompt_3=None, device=None, num_images_per_prompt=1,
                      do_classifier_free_guidance=False):
        e = torch.stack([torch.full((6, 8), float(len(p))) for p in prompt])
        return e, None, e[:, 0, :4], None

    pipe = types.SimpleNamespace(transformer=PointMassFlow(c), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                 device=torch.device("cpu"), vae_scale_factor=8, encode_prompt=encode_prompt,
                                 text_encoder_3=None, vae=None)
    RC.generate_couplings(pipe, PROMPTS[:3], tmp_path, num_steps=4, num_windows=2, solver="dpmpp",
                         guidance_scale=2.0, progress=False)
    cs = couplings_io.load_couplings(tmp_path)
    torch.testing.assert_close(cs.tensor("data"), c.expand(3, -1, -1, -1), atol=1e-5, rtol=0)
    obj = ReflowObjective(load_config(None, method="reflow", couplings_dir=str(tmp_path), reflow_windows=2), pipe,
                          ACCEL)
    assert obj.prediction_type == "flow" and obj.sigma_max == 1.0 and obj.resolution == 32
    loss, _ = obj.loss(pipe.transformer, None, collate_rows(obj.dataset, torch.arange(8) % 3),
                       torch.Generator().manual_seed(0))
    assert float(loss) < 1e-8
    sched = PiecewiseRectifiedFlowScheduler(prediction_type="flow", num_windows=2)
    sched.set_timesteps(2)
    x = cs.tensor("noise")
    for t in sched.timesteps:
        x = sched.step(pipe.transformer(x, t.expand(len(x)), **collate_rows(obj.dataset, range(3))["cond"])[0], t,
                       x).prev_sample
    torch.testing.assert_close(x, c.expand_as(x), atol=1e-5, rtol=0)
    assert native_loss_weight(torch.rand(3), "flow").eq(1).all()
    with pytest.raises(ConfigError, match="flow/flow teacher"):  # couplings from another kind of teacher
        ReflowObjective(load_config(None, method="reflow", couplings_dir=str(tmp_path)),
                        types.SimpleNamespace(unet=PointMassUNet(c[:4], cs_ac_default(), "epsilon"),
                                              scheduler=_sd_scheduler(), vae_scale_factor=4), ACCEL)


def cs_ac_default():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def _sd_scheduler():
    from diffusers import PNDMScheduler

    from stepdistill.toy.models import SD_SCHEDULER_CONFIG

    return PNDMScheduler.from_config(SD_SCHEDULER_CONFIG)


def test_sdxl_student_velocity_runs_with_micro_conditioning(tmp_path):
    from tiny_models import tiny_sdxl_pipe

    pipe = tiny_sdxl_pipe()
    RC.generate_couplings(pipe, PROMPTS[:2], tmp_path, num_steps=2, num_windows=1, guidance_scale=2.0, progress=False)
    obj = ReflowObjective(load_config(None, method="reflow", couplings_dir=str(tmp_path)), pipe, ACCEL)
    loss, _ = obj.loss(pipe.unet, pipe.unet, collate_rows(obj.dataset, [0, 1]), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and float(loss) > 0


def test_cli_reflow_train(tiny_setup, tmp_path):
    import argparse

    model, couplings = tiny_setup
    parser = argparse.ArgumentParser()
    cli_reflow.add_reflow_commands(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(["reflow", "train", f"pretrained_model={model}", f"output_dir={out}", "max_train_steps=1",
                              "train_batch_size=2", "lora_rank=2", "report_to=none", "checkpointing_steps=0",
                              "reflow_windows=2", "--couplings", couplings])
    args.func(args)
    assert (out / "pytorch_lora_weights.safetensors").exists()
    (tmp_path / "lcd.yaml").write_text("method: lcd\n")
    args = parser.parse_args(["reflow", "train", str(tmp_path / "lcd.yaml"), "--couplings", couplings])
    with pytest.raises(ConfigError, match="not a reflow one"):
        args.func(args)


def test_one_step_distillation_stage_starts_from_the_reflow_lora(tiny_setup, tmp_path):
    """InstaFlow's 2nd stage: `init_lora` puts the reflow LoRA into the trained adapter exactly (a zero-lr run
    writes it back unchanged up to fp16), `reflow_time_distribution='noise'` trains only at the noise end, and
    the stage refuses windows or a LoRA of another rank."""
    model, couplings = tiny_setup
    stage1 = train(_config(model, couplings, tmp_path / "stage1", reflow_windows=1, lora_alpha=8))
    first = lora.read_lora_layers(stage1 / "pytorch_lora_weights.safetensors")
    same = train(_config(model, couplings, tmp_path / "copy", reflow_windows=1, init_lora=str(stage1),
                         learning_rate=0.0, max_train_steps=1, lr_warmup_steps=0))
    copied = lora.read_lora_layers(same / "pytorch_lora_weights.safetensors")
    assert copied.keys() == first.keys()
    for name, (down, up, alpha) in first.items():
        torch.testing.assert_close(lora.lora_delta(*copied[name]), lora.lora_delta(down, up, alpha),
                                   atol=2e-3 * float(lora.lora_delta(down, up, alpha).abs().max()) + 1e-6,
                                   rtol=0, msg=name)
    # the stage's couplings come from the reflowed student itself (CLI: --lora fuses it; guidance defaults to 1)
    from stepdistill.cli import main

    main(["reflow", "couple", "--model", model, "--lora", str(stage1), "--prompts", "toy:3", "--steps", "2",
          "--out", str(tmp_path / "c2"), "--device", "cpu"])
    student_couplings = couplings_io.load_couplings(tmp_path / "c2")
    assert student_couplings.manifest["guidance_scale"] == 1.0 and len(student_couplings) == 3
    assert not torch.equal(student_couplings.tensor("data"), couplings_io.load_couplings(couplings).tensor("data")[:3])
    stage2 = train(_config(model, str(tmp_path / "c2"), tmp_path / "stage2", reflow_windows=1,
                           init_lora=str(stage1), reflow_time_distribution="noise"))
    second = lora.read_lora_layers(stage2 / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(second[n][1], first[n][1]) for n in first)  # it trained from there
    s = reflow.sample_flow_times(5, torch.Generator().manual_seed(0), "noise", sigma_max=0.99)
    assert torch.equal(s, torch.full((5,), 0.99))
    with pytest.raises(ConfigError, match="reflow_windows=1"):
        train(_config(model, couplings, tmp_path / "bad", reflow_windows=2, reflow_time_distribution="noise"))
    with pytest.raises(lora.LoraFormatError, match="rank"):
        train(_config(model, couplings, tmp_path / "bad2", reflow_windows=1, lora_rank=2, init_lora=str(stage1)))
