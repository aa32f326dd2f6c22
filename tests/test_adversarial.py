"""method: adversarial on a tiny random SD-shaped pipeline: the discriminator reads the frozen teacher (adapter
disabled, no gradient into base weights), the GAN and distillation terms each lower their loss, the adapter loads
in stock diffusers layer by layer, and a resumed run continues both optimizers exactly."""
import copy

import pytest
import torch
from accelerate import Accelerator
from resume_check import check_resume_is_exact
from safetensors.torch import load_file
from tiny_models import descend, lora_params
from torch.utils.data import default_collate

from stepdistill import adversarial, lora
from stepdistill.errors import ConfigError
from stepdistill.methods import build_objective
from stepdistill.methods.features import FeatureTap
from stepdistill.sampling import sampler_from_lora
from stepdistill.training.config import load_config
from stepdistill.training.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(out, model="toy", **kw):
    base = {"method": "adversarial", "pretrained_model": model, "output_dir": str(out), "train_data": "toy:16",
            "lora_rank": 4, "train_batch_size": 2, "max_train_steps": 2, "checkpointing_steps": 2,
            "learning_rate": 1e-3, "validation_steps": 0, "report_to": "none", "cache_dir": str(out) + "-cache",
            "w_min": 1.0, "w_max": 2.0, "disc_head_channels": 16, "disc_learning_rate": 1e-3, "disc_r1_weight": 0.1,
            "gan_loss_weight": 1.0}
    base.update(kw)
    return load_config(None, **base)


def _objective(pipe, tmp_path, **kw):
    objective = build_objective(_config(tmp_path / "run", **kw), pipe, Accelerator(cpu=True))
    lora.add_lora_to_unet(pipe.unet, rank=4, alpha=4)
    with torch.no_grad():  # a LoRA that changes the UNet, so "adapter disabled" is observable
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    batch = default_collate([objective.dataset[i] for i in range(2)])
    return objective, batch


def test_discriminator_reads_the_frozen_teacher_and_no_gradient_reaches_base_weights(tiny_random_pipe, tmp_path):
    base_unet = copy.deepcopy(tiny_random_pipe.unet)
    objective, batch = _objective(tiny_random_pipe, tmp_path)
    unet = tiny_random_pipe.unet
    real, _, _, cond = objective.gan_batch(batch, torch.Generator().manual_seed(0))
    t_hat = torch.tensor([300, 700])
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    got = objective.teacher_features(unet, real, noise, t_hat, cond)
    x = adversarial.renoise(real, noise, t_hat, objective.alphas_cumprod)
    with torch.no_grad(), FeatureTap(base_unet, objective.layers) as tap:
        base_unet(x, t_hat, **cond)
    want = tap.features
    with torch.no_grad(), FeatureTap(unet, objective.layers) as tap:
        unet(x, t_hat, **cond)  # the adapter is back on after the discriminator pass
    adapted = tap.features
    for g, w, a in zip(got, want, adapted):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert (a - w).abs().max() > 1e-4

    heads_before = [p.detach().clone() for p in objective.disc.heads.parameters()]
    loss, logs = objective.loss(unet, unet, batch, torch.Generator().manual_seed(2))
    loss.backward()
    assert {"distill", "gan_g", "disc_loss", "r1"} <= logs.keys()
    for name, p in unet.named_parameters():
        if "lora_" in name:
            assert p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert all(p.grad is None for p in objective.disc.heads.parameters())  # the generator's backward spares them
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, objective.disc.heads.parameters()))


def test_gan_term_and_distillation_term_each_lower_their_loss(tiny_random_pipe, tmp_path):
    objective, batch = _objective(tiny_random_pipe, tmp_path, disc_learning_rate=0.0)  # a fixed discriminator
    unet = tiny_random_pipe.unet
    state = {k: v.clone() for k, v in unet.state_dict().items()}

    def gan_term():  # the same batch, noise and t_hat every call
        gen = torch.Generator().manual_seed(3)
        return objective.gan_loss(unet, unet, *objective.gan_batch(batch, gen), gen)[0]

    first = gan_term()
    descend(gan_term, lora_params(unet), 3, torch.optim.SGD, lr=0.5)
    assert float(gan_term().detach()) < float(first.detach()) - 1e-3  # the student fools the fixed discriminator more

    unet.load_state_dict(state)  # back to the start: now the distillation term alone

    def distill_term():
        return objective.distill.loss(unet, unet, batch, torch.Generator().manual_seed(4))[0]

    first = distill_term()
    descend(distill_term, lora_params(unet), 3, lr=3e-3)
    assert float(distill_term().detach()) < 0.98 * float(first.detach())


def test_discriminator_step_lowers_its_loss(tiny_random_pipe, tmp_path):
    objective, batch = _objective(tiny_random_pipe, tmp_path, disc_r1_weight=0.0)
    unet = tiny_random_pipe.unet
    real, x, time, cond = objective.gan_batch(batch, torch.Generator().manual_seed(0))
    t_hat = torch.tensor([100, 500])
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fake = objective.one_step_sample(unet, x, time, cond)
        real_f = objective.teacher_features(unet, real, noise, t_hat, cond)
        fake_f = objective.teacher_features(unet, fake, noise, t_hat, cond)
    text = cond["encoder_hidden_states"]
    losses = [objective.discriminator_step(real_f, fake_f, t_hat, text)["disc_loss"] for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05


def test_adapter_loads_in_stock_diffusers_and_names_its_sampler(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = train(_config(tmp_path / "adv", model=tiny_model_dir))
    file = out / "pytorch_lora_weights.safetensors"
    sd, metadata, fmt = lora.read_lora(file)
    assert fmt == "kohya" and all(k.startswith("lora_unet_") for k in sd)  # no discriminator tensor in the adapter
    assert metadata["stepdistill.method"] == "adversarial" and metadata["stepdistill.distillation"] == "lcd"
    assert metadata["stepdistill.recommended_steps"] == "1"
    assert sampler_from_lora([metadata]) == ("lcm", None)
    assert (out / "checkpoint-2" / "custom_checkpoint_0.pkl").is_file()  # the heads live in the checkpoint

    stock = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    stock.load_lora_weights(str(out), adapter_name="adv")
    report = lora.verify_lora_loaded(stock, file, "adv")
    trained = load_file(str(out / "checkpoint-2" / "lora_state.safetensors"))
    assert report.loaded == report.expected == len({k.rsplit(".lora_", 1)[0] for k in trained}) > 50


def test_resume_is_exact_for_lora_and_discriminator(tiny_model_dir, tmp_path):
    full, resumed = check_resume_is_exact(lambda out, **kw: _config(out, model=tiny_model_dir, **kw), tmp_path)
    a = torch.load(full / "checkpoint-4" / "custom_checkpoint_0.pkl", weights_only=False)
    b = torch.load(resumed / "checkpoint-4" / "custom_checkpoint_0.pkl", weights_only=False)
    start = torch.load(full / "checkpoint-2" / "custom_checkpoint_0.pkl", weights_only=False)
    assert any(not torch.equal(start["heads"][k], a["heads"][k]) for k in a["heads"])
    for k in a["heads"]:
        torch.testing.assert_close(a["heads"][k], b["heads"][k], rtol=0, atol=1e-6, msg=k)
    for i, s in a["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s[k], b["optimizer"]["state"][i][k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw, match", [
    ({"adv_distillation": "dmd"}, "adv_distillation must be one of"),
    ({"gan_loss": "wgan"}, "gan_loss must be one of"),
    ({"gan_loss_weight": -1.0}, "gan_loss_weight must be a finite number >= 0"),
    ({"disc_timesteps": [1000]}, r"disc_timesteps must be .* \[0, 999\]"),
    ({"adv_distillation": "reflow", "reflow_windows": 2}, "set reflow_windows=1"),
    ({"distill_loss_weight": 0.0, "gan_loss_weight": 0.0}, "leaves nothing to train"),
    ({"distill_loss_weight": 0.0, "data_loss_weight": 0.1}, "with distill_loss_weight=0 turn them off"),
    ({"distill_loss_weight": float("nan")}, "distill_loss_weight must be a finite number >= 0"),
    ({"validation_couplings_dir": "x"}, "validation_couplings_dir measures a held-out loss on couplings"),
    ({"adv_distillation": "reflow", "reflow_loss_type": "huber"}, "reflow_loss_type must be one of"),
])
def test_bad_settings_are_one_line_errors(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path / "x", **kw)


def test_distill_loss_weight_scales_the_distillation_term_and_zero_skips_it(tiny_random_pipe, tmp_path):
    objective, batch = _objective(tiny_random_pipe, tmp_path, gan_loss_weight=0.0)
    unet = tiny_random_pipe.unet
    full, _ = objective.loss(unet, unet, batch, torch.Generator().manual_seed(3))
    objective.config.distill_loss_weight = 0.5
    half, _ = objective.loss(unet, unet, batch, torch.Generator().manual_seed(3))
    torch.testing.assert_close(half, 0.5 * full)
    assert float(full.detach()) > 0

    calls = []
    distill_loss = objective.distill.loss
    objective.distill.loss = lambda *a: calls.append(1) or distill_loss(*a)
    objective.config.distill_loss_weight, objective.config.gan_loss_weight = 0.0, 1.0
    gan_only, logs = objective.loss(unet, unet, batch, torch.Generator().manual_seed(3))
    assert not calls and "distill" not in logs and "gan_g" in logs  # the GAN term alone, LADD-style
    torch.testing.assert_close(gan_only, torch.tensor(logs["gan_g"]), rtol=1e-5, atol=1e-6)
    objective.config.distill_loss_weight = 1.0
    objective.loss(unet, unet, batch, torch.Generator().manual_seed(3))
    assert calls == [1]


def test_unknown_discriminator_layer_is_named(tiny_random_pipe, tmp_path):
    with pytest.raises(ConfigError, match="layer 'mid_blok' is not in the UNet2DConditionModel"):
        build_objective(_config(tmp_path / "run", disc_layers=["mid_blok"]), tiny_random_pipe, Accelerator(cpu=True))


def test_reflow_distillation_variant_trains_and_names_the_flow_sampler(tiny_random_pipe, tmp_path):
    from tiny_models import PROMPTS

    from stepdistill.methods import reflow_couplings

    model = tmp_path / "tiny-sd"
    tiny_random_pipe.save_pretrained(model)
    reflow_couplings.generate_couplings(tiny_random_pipe, PROMPTS, tmp_path / "couplings", num_steps=2,
                                        num_windows=1, guidance_scale=2.0, model_id=str(model), progress=False)
    out = train(_config(tmp_path / "adv-reflow", model=str(model), adv_distillation="reflow",
                        couplings_dir=str(tmp_path / "couplings"), train_data="toy:1", reflow_loss_type="pseudo_huber",
                        validation_couplings_dir=str(tmp_path / "couplings"), validation_batches=1))
    _, metadata, _ = lora.read_lora(out / "pytorch_lora_weights.safetensors")
    assert metadata["stepdistill.method"] == "adversarial" and metadata["stepdistill.distillation"] == "reflow"
    assert metadata["stepdistill.loss_type"] == "pseudo_huber"  # the reflow term's distance, in the header
    assert float(metadata["stepdistill.heldout_loss"]) > 0  # its regression measured on the validation couplings
    assert sampler_from_lora([metadata]) == ("perflow", 1)
    assert not (out / "cache").exists()  # the reflow term trains on the couplings, the GAN term too


def test_demo_reports_the_adversarial_student_beside_its_baseline(tmp_path):
    from stepdistill.experiments.demo import run_demo

    overrides = {"max_train_steps": 2, "train_data": "toy:8", "train_batch_size": 2, "lora_rank": 4,
                 "disc_head_channels": 8, "checkpointing_steps": 0, "cache_dir": str(tmp_path / "cache")}
    report = run_demo(tmp_path / "demo", n_prompts=4, device="cpu", method="adversarial", grid_prompts=2,
                      adversarial_overrides=overrides)
    assert set(report["adversarial"]) >= {"1", "2", "4", "8", "train_seconds"}
    assert report["baseline"]["adversarial"]["1"]["toy_fid"] == report["baseline"]["lcd"]["1"]["toy_fid"]
    text = (tmp_path / "demo" / "report.txt").read_text()
    assert "adversarial:base" in text
    assert (tmp_path / "demo" / "lora-adversarial" / "pytorch_lora_weights.safetensors").is_file()


def test_toy_recipe_is_the_packaged_one_and_loads():
    from pathlib import Path

    from stepdistill.toy.world import toy_recipe

    link = Path(__file__).parent.parent / "configs" / "toy-adversarial.yaml"
    assert link.resolve() == toy_recipe("adversarial").resolve()
    config = load_config(link)
    assert config.method == "adversarial" and config.adv_distillation == "lcd" and config.gan_loss_weight > 0
