"""Knowledge-distillation levers (stepdistill/methods/levers.py) on a tiny random SD-shaped pipeline: the data and
feature terms add exactly their weighted losses and each lowers its own loss, several teachers give their weighted
prediction (the base twice is the base), and bad settings are one-line errors."""
import pytest
import torch
from accelerate import Accelerator
from tiny_models import descend, lora_params
from torch.utils.data import default_collate

from stepdistill import lora
from stepdistill.errors import ConfigError
from stepdistill.methods import build_objective
from stepdistill.methods.features import adapters_disabled
from stepdistill.toy.teacher import build_random_pipeline
from stepdistill.training.config import load_config
from stepdistill.training.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(out, model, **kw):
    base = {"method": "lcd", "pretrained_model": model, "output_dir": str(out), "train_data": "toy:16",
            "lora_rank": 4, "train_batch_size": 2, "max_train_steps": 2, "checkpointing_steps": 0,
            "learning_rate": 1e-3, "validation_steps": 0, "report_to": "none", "cache_dir": str(out) + "-cache",
            "w_min": 1.0, "w_max": 2.0}
    base.update(kw)
    return load_config(None, **base)


def _objective(pipe, model, tmp_path, **kw):
    objective = build_objective(_config(tmp_path / "run", model, **kw), pipe, Accelerator(cpu=True))
    lora.add_lora_to_unet(pipe.unet, rank=4, alpha=4)
    return objective, default_collate([objective.dataset[i] for i in range(2)])


def _perturb_lora(unet, scale=0.05):
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))


def test_data_and_feature_terms_add_their_weighted_losses(tiny_random_pipe, tiny_model_dir, tmp_path):
    objective, batch = _objective(tiny_random_pipe, tiny_model_dir, tmp_path, data_loss_weight=0.3,
                                  feature_loss_weight=2.0, feature_layers=["mid_block", "down_blocks.1"])
    unet = tiny_random_pipe.unet
    with torch.no_grad():
        _, logs = objective.loss(unet, unet, batch, torch.Generator().manual_seed(0))
    assert logs["feature_loss"] == 0.0  # the LoRA starts at zero: the student's features are the teacher's
    _perturb_lora(unet)
    with torch.no_grad():
        total, logs = objective.loss(unet, unet, batch, torch.Generator().manual_seed(0))
        objective.levers.active = False  # the method's own term, same generator draws up to there
        plain, _ = objective.loss(unet, unet, batch, torch.Generator().manual_seed(0))
        objective.levers.active = True
    assert logs["feature_loss"] > 0 and logs["data_loss"] > 0
    torch.testing.assert_close(float(total), float(plain) + 0.3 * logs["data_loss"] + 2.0 * logs["feature_loss"],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("term", ["data_loss", "feature_loss"])
def test_each_lever_lowers_its_own_loss(tiny_random_pipe, tiny_model_dir, tmp_path, term):
    objective, _ = _objective(tiny_random_pipe, tiny_model_dir, tmp_path, **{f"{term}_weight": 1.0})
    unet = tiny_random_pipe.unet
    _perturb_lora(unet)

    def value():
        zero = torch.zeros((), requires_grad=True)
        _, logs = objective.levers.add(zero, {}, unet, unet, 2, torch.Generator().manual_seed(5))
        return logs[term]

    def step_loss():
        zero = torch.zeros(())
        loss, _ = objective.levers.add(zero, {}, unet, unet, 2, torch.Generator().manual_seed(5))
        return loss

    first = value()
    descend(step_loss, lora_params(unet), 4, lr=3e-3)
    assert value() < 0.95 * first


def test_several_teachers_give_their_weighted_prediction(tiny_random_pipe, tiny_model_dir, tmp_path):
    variant = build_random_pipeline(seed=1)  # a tiny "fine-tune": same shapes, other weights
    variant_dir = tmp_path / "variant"
    variant.save_pretrained(variant_dir)
    objective, _ = _objective(tiny_random_pipe, tiny_model_dir, tmp_path,
                              teachers=[f"{tiny_model_dir}@1", f"{variant_dir}@3"])
    unet = tiny_random_pipe.unet
    _perturb_lora(unet)  # the base member must be read with the adapter disabled
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 800])
    cond = {"encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim,
                                                 generator=torch.Generator().manual_seed(1))}
    got = objective.teachers(unet, unet, x, t, cond)
    with torch.no_grad(), adapters_disabled(unet):
        base = unet(x, t, **cond).sample
    with torch.no_grad():
        other = variant.unet(x, t, **cond).sample
    assert (base - other).abs().max() > 1e-2
    torch.testing.assert_close(got, 0.25 * base + 0.75 * other, rtol=1e-5, atol=1e-6)

    # the base named twice (a copy on disk) is the base: the LCD loss is unchanged
    copy = tmp_path / "copy"
    build_random_pipeline(seed=0).save_pretrained(copy)
    same, _ = _objective(build_random_pipeline(seed=0), tiny_model_dir, tmp_path / "b",
                         teachers=[f"{tiny_model_dir}@0.5", f"{copy}@0.5"])
    assert [m is None for m, _ in same.teachers.members] == [True, False]
    torch.testing.assert_close(same.teachers(unet, unet, x, t, cond), base, rtol=1e-5, atol=1e-6)


def test_levers_run_in_the_training_loop(tiny_model_dir, tmp_path):
    out = train(_config(tmp_path / "lev", tiny_model_dir, data_loss_weight=0.5, feature_loss_weight=0.5))
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("kw, match", [
    ({"data_loss_weight": -0.1}, "data_loss_weight must be a finite number >= 0"),
    ({"feature_loss_weight": 1.0, "feature_layers": []}, "feature_loss_weight > 0 needs feature_layers"),
    ({"teachers": ["toy@x"]}, "teachers entry 'toy@x' must be MODEL or MODEL@WEIGHT"),
    ({"teachers": ["toy@0"]}, "weights must sum to a positive number"),
    ({"method": "reflow", "teachers": ["toy@1"]}, "reflow's targets are fixed in its couplings"),
])
def test_bad_lever_settings_are_one_line_errors(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path / "x", "toy", **kw)


def test_teacher_of_another_shape_is_refused(tiny_random_pipe, tiny_model_dir, tmp_path):
    from tiny_models import tiny_sdxl_pipe

    other = tmp_path / "sdxl"
    tiny_sdxl_pipe().save_pretrained(other)
    with pytest.raises(ConfigError, match="must share the base's shapes"):
        build_objective(_config(tmp_path / "run", tiny_model_dir, teachers=[tiny_model_dir, str(other)]),
                        tiny_random_pipe, Accelerator(cpu=True))
