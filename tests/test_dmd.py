"""The DMD term of method: adversarial (``dmd_loss_weight``): its math, the fake score as a second LoRA that never
reaches the student's file, the direction the term moves the student, and exact resume of the fake score."""
import pytest
import torch
from accelerate import Accelerator
from resume_check import check_resume_is_exact
from safetensors.torch import load_file
from test_adversarial import _config
from torch.utils.data import default_collate

from stepdistill import adversarial, lora
from stepdistill.errors import ConfigError
from stepdistill.methods import build_objective
from stepdistill.methods.dmd import FAKE_ADAPTER, active_adapter
from stepdistill.training.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DMD = {"gan_loss_weight": 0.0, "dmd_loss_weight": 1.0, "dmd_fake_rank": 4, "dmd_fake_learning_rate": 1e-2,
       "dmd_real_guidance": 2.0}


def test_distribution_matching_gradient_points_from_fake_to_real():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g).requires_grad_(True)
    real, fake = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    adversarial.distribution_matching_loss(x, real, fake).backward()
    norm = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x.grad, (fake - real) / norm / x.numel())  # descent moves x towards real - fake
    x.grad = None
    adversarial.distribution_matching_loss(x, real, real).backward()
    assert x.grad.abs().max() == 0  # equal scores: nothing to match


def _objective(pipe, tmp_path, **kw):
    objective = build_objective(_config(tmp_path / "run", **{**DMD, **kw}), pipe, Accelerator(cpu=True))
    lora.add_lora_to_unet(pipe.unet, rank=4, alpha=4)  # the student's adapter, as the loop adds it afterwards
    batch = default_collate([objective.dataset[i] for i in range(2)])
    return objective, batch


def test_fake_score_is_a_second_adapter_trained_apart_from_the_student(tiny_random_pipe, tmp_path):
    objective, batch = _objective(tiny_random_pipe, tmp_path)
    unet = tiny_random_pipe.unet
    assert unet.active_adapters() == ["default"]
    student = [p for n, p in unet.named_parameters() if ".default." in n]
    fake = objective.dmd.params
    assert fake and all(p.requires_grad for p in student) and not any(p.requires_grad for p in fake)
    fake_before = [p.detach().clone() for p in fake]
    base_before = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" not in n}

    loss, logs = objective.loss(unet, unet, batch, torch.Generator().manual_seed(1))
    loss.backward()
    assert {"distill", "dmd", "fake_score_loss"} <= logs.keys() and "gan_g" not in logs
    assert unet.active_adapters() == ["default"]  # restored after the fake-score passes
    assert all(p.grad is not None for p in student)
    assert all(p.grad is None for p in fake)  # the generator's backward leaves the fake score alone
    assert any(not torch.equal(a, b) for a, b in zip(fake_before, fake))  # ... which its own step updated
    for n, p in unet.named_parameters():
        if "lora_" not in n:
            assert p.grad is None and torch.equal(p, base_before[n]), n


def test_dmd_term_moves_the_one_step_sample_from_the_fake_score_towards_the_teacher(tiny_random_pipe, tmp_path):
    objective, batch = _objective(tiny_random_pipe, tmp_path)
    unet, dmd = tiny_random_pipe.unet, objective.dmd
    with torch.no_grad():  # a fake score that differs from the teacher
        for p in dmd.params:
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    gen = torch.Generator().manual_seed(2)
    real, x, time, cond = objective.gan_batch(batch, gen)
    _, uncond = objective.distill.data.conditioning(batch)
    t = torch.tensor([400, 600])
    noise = torch.randn(real.shape, generator=gen)

    def sample():
        return objective.one_step_sample(unet, x, time, cond)

    with torch.no_grad():
        before = sample()
        x_t = adversarial.renoise(before, noise, t, objective.alphas_cumprod)
        direction = dmd.real_x0(unet, x_t, t, cond, uncond) - dmd.fake_x0(unet, x_t, t, cond)
        assert direction.abs().mean() > 1e-3
    student = [p for n, p in unet.named_parameters() if ".default." in n]
    with torch.no_grad():
        pred_real, pred_fake = dmd.real_x0(unet, x_t, t, cond, uncond), dmd.fake_x0(unet, x_t, t, cond)
    adversarial.distribution_matching_loss(sample(), pred_real, pred_fake).backward()
    with torch.no_grad():  # a small step down the gradient (normalised: first order)
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in student))
        for p in student:
            p -= 1e-3 * p.grad / norm
        moved = sample() - before
    assert moved.abs().max() > 0
    # to first order the step lowers the surrogate, i.e. moves the sample along pred_real - pred_fake
    assert float((moved * direction).sum()) > 0
    with torch.no_grad():  # and the opposite step moves it the other way
        for p in student:
            p += 2e-3 * p.grad / norm
        assert float(((sample() - before) * direction).sum()) < 0


def test_dmd_adapter_file_and_exact_resume(tiny_model_dir, tmp_path):
    """With ``ema_decay`` too: the moving average covers the student's adapter only (not the fake score's), and
    it resumes exactly beside both optimizers."""
    full, resumed = check_resume_is_exact(
        lambda out, **kw: _config(out, model=tiny_model_dir, **{**DMD, "ema_decay": 0.9, **kw}), tmp_path)
    averaged, again = (load_file(str(run / "checkpoint-4" / "ema_state.safetensors")) for run in (full, resumed))
    trained = load_file(str(full / "checkpoint-4" / "lora_state.safetensors"))
    assert not any(FAKE_ADAPTER in k for k in averaged) and len(averaged) == len(trained) > 0
    assert all(torch.equal(averaged[k], again[k]) for k in averaged)
    from diffusers import StableDiffusionPipeline

    file = full / "pytorch_lora_weights.safetensors"
    sd, metadata, _ = lora.read_lora(file)
    assert not any(FAKE_ADAPTER in k for k in sd) and metadata["stepdistill.dmd_loss_weight"] == "1.0"
    stock = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    stock.load_lora_weights(str(full), adapter_name="adv")
    report = lora.verify_lora_loaded(stock, file, "adv")  # every student layer, and nothing of the fake score
    assert report.loaded == report.expected > 50
    a = torch.load(full / "checkpoint-4" / "custom_checkpoint_1.pkl", weights_only=False)
    b = torch.load(resumed / "checkpoint-4" / "custom_checkpoint_1.pkl", weights_only=False)
    start = torch.load(full / "checkpoint-2" / "custom_checkpoint_1.pkl", weights_only=False)
    assert a["lora"].keys() == b["lora"].keys() and len(a["lora"]) > 50
    assert any(not torch.equal(start["lora"][k], a["lora"][k]) for k in a["lora"])
    for k in a["lora"]:
        torch.testing.assert_close(a["lora"][k], b["lora"][k], rtol=0, atol=1e-6, msg=k)


def test_active_adapter_restores_the_student(tiny_random_pipe, tmp_path):
    objective, _ = _objective(tiny_random_pipe, tmp_path)
    unet = tiny_random_pipe.unet
    with active_adapter(unet, FAKE_ADAPTER):
        assert unet.active_adapters() == [FAKE_ADAPTER]
    assert unet.active_adapters() == ["default"]


@pytest.mark.parametrize("kw, match", [
    ({"dmd_timestep_range": [900, 100]}, "dmd_timestep_range must be"),
    ({"dmd_fake_updates": 0}, "must be >= 1"),
])
def test_bad_dmd_settings_are_one_line_errors(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path / "x", **{**DMD, **kw})


def test_training_with_dmd_and_gan_together(tiny_model_dir, tmp_path):
    out = train(_config(tmp_path / "both", model=tiny_model_dir, **{**DMD, "gan_loss_weight": 0.5}))
    card = (out / "stepdistill_card.json").read_text()
    assert '"dmd_loss_weight": 1.0' in card and '"gan_loss_weight": 0.5' in card


def test_dmd_with_the_reflow_term_guides_with_the_encoded_empty_prompt(tiny_random_pipe, tmp_path):
    """Couplings carry no unconditional side: the real score's empty prompt is encoded once, and it is the
    pipeline's own empty-prompt embedding (what CFG uses at inference)."""
    from tiny_models import PROMPTS

    from stepdistill.methods import reflow_couplings
    from stepdistill.models.family import encode_prompts

    model = tmp_path / "tiny-sd"
    tiny_random_pipe.save_pretrained(model)
    reflow_couplings.generate_couplings(tiny_random_pipe, PROMPTS, tmp_path / "couplings", num_steps=2,
                                        num_windows=1, guidance_scale=2.0, model_id=str(model), progress=False)
    kw = {**DMD, "gan_loss_weight": 0.5, "adv_distillation": "reflow", "couplings_dir": str(tmp_path / "couplings"),
          "train_data": "toy:1"}
    objective = build_objective(_config(tmp_path / "obj", model=str(model), **kw), tiny_random_pipe,
                                Accelerator(cpu=True))
    expected = encode_prompts(tiny_random_pipe, [""])["prompt_embeds"][0]
    torch.testing.assert_close(objective.empty.uncond.cpu(), expected)
    cond = {"encoder_hidden_states": torch.zeros(3, *expected.shape)}
    assert objective.empty.unconditional(cond)["encoder_hidden_states"].shape == (3, *expected.shape)
    out = train(_config(tmp_path / "run", model=str(model), **kw))
    card = (out / "stepdistill_card.json").read_text()
    assert '"dmd_loss_weight": 1.0' in card and '"distillation": "reflow"' in card
