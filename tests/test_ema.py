"""``ema_decay``: the adapter's exponential moving average (stepdistill/training/ema.py). The average follows
diffusers' EMAModel update of the trained weights, leaves training untouched, is what the run writes, and a
resumed run continues it exactly."""
from __future__ import annotations

import pytest
import torch
from resume_check import RESUME_KW, check_resume_is_exact
from safetensors.torch import load_file
from test_reflow_training import _config as reflow_config

from stepdistill import lora
from stepdistill.errors import CheckpointError, ConfigError
from stepdistill.training.checkpoints import LORA_STATE
from stepdistill.training.config import load_config
from stepdistill.training.ema import EMA_STATE, AdapterEMA
from stepdistill.training.loop import lora_target_modules, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small kernels: see tests/conftest.py


def ema_decay_at(n: int, decay: float) -> float:
    """diffusers' EMAModel decay at its n-th update (no warm-up schedule): 0, then (1 + k) / (10 + k), capped."""
    k = n - 1
    return 0.0 if k <= 0 else min(decay, (1 + k) / (10 + k))


def test_average_follows_the_update_rule_and_swaps_back():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([("w", p)], decay=0.5)
    expected = torch.zeros(3)
    for n, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        with torch.no_grad():
            p.fill_(value)
        ema.update()
        d = ema_decay_at(n, 0.5)
        expected = d * expected + (1 - d) * torch.full((3,), value)
    assert ema.average.shadow_params[0].tolist() == pytest.approx(expected.tolist())
    assert expected[0] != 8.0  # the average lags the weights
    with ema.swapped_in():
        assert torch.equal(p.detach(), ema.average.shadow_params[0])
    assert torch.equal(p.detach(), torch.full((3,), 8.0))  # the trained weights are back


def _config(model, couplings, out, **kw):
    """The reflow tests' run (tests/test_reflow_training.py), 4 steps with a checkpoint after each."""
    return reflow_config(model, couplings, out, **{
        "max_train_steps": 4, "checkpointing_steps": 1, "checkpoints_total_limit": 10, "learning_rate": 1e-2,
        "reflow_time_distribution": "logit_normal", **kw})


def test_run_writes_the_average_of_the_trained_weights(tiny_setup, tmp_path):
    """The weights a run trains are the same with and without ema_decay; the average in each checkpoint is the
    EMA recursion over the plain run's weights, step by step; the adapter written (loaded in a fresh model) is that
    average, not the last weights; the card records the decay."""
    model, couplings = tiny_setup
    plain = train(_config(model, couplings, tmp_path / "plain"))
    averaged = train(_config(model, couplings, tmp_path / "ema", ema_decay=0.9))
    expected = None
    for step in range(1, 5):
        weights = load_file(str(plain / f"checkpoint-{step}" / LORA_STATE))
        same = load_file(str(averaged / f"checkpoint-{step}" / LORA_STATE))
        assert all(torch.equal(weights[k], same[k]) for k in weights)  # training untouched
        d = ema_decay_at(step, 0.9)
        expected = {k: v.clone() if expected is None else d * expected[k] + (1 - d) * v for k, v in weights.items()}
        saved = {k.replace(".default", ""): v for k, v in
                 load_file(str(averaged / f"checkpoint-{step}" / EMA_STATE)).items()}
        assert saved.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(saved[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    last = load_file(str(plain / "checkpoint-4" / LORA_STATE))
    assert max((expected[k] - last[k]).abs().max() for k in last) > 1e-4  # the average is not the last weights

    cfg = _config(model, couplings, "unused")
    from stepdistill.models.pipeline import load_pipeline

    unet = load_pipeline(model).unet
    lora.add_lora_to_unet(unet, rank=cfg.lora_rank, alpha=cfg.lora_rank, target_modules=lora_target_modules(cfg, unet))
    lora.init_adapter_from_file(unet, averaged / "pytorch_lora_weights.safetensors")
    loaded = {k.replace(".default", ""): p.detach() for k, p in unet.named_parameters() if p.requires_grad}
    assert loaded.keys() == expected.keys()
    for k in expected:  # the file holds fp16 or fp32 weights
        torch.testing.assert_close(loaded[k], expected[k], rtol=2e-3, atol=1e-4, msg=k)
    card = (averaged / "stepdistill_card.json").read_text()
    assert '"ema_decay": 0.9' in card


def test_resume_continues_the_average_exactly(tiny_setup, tmp_path):
    model, couplings = tiny_setup
    full, resumed = check_resume_is_exact(
        lambda out, **kw: _config(model, couplings, out, **{**kw, "ema_decay": 0.8}), tmp_path)
    a = load_file(str(full / "checkpoint-4" / EMA_STATE))
    b = load_file(str(resumed / "checkpoint-4" / EMA_STATE))
    w = load_file(str(full / "checkpoint-4" / LORA_STATE))
    assert a.keys() == b.keys() and len(a) == len(w) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(a[k], w[k.replace(".default", "")]) for k in a)
    # a checkpoint whose average is missing, or a run that turns the average on or off, is refused in one line
    (resumed / "checkpoint-4" / EMA_STATE).unlink()
    ema = AdapterEMA([(k, torch.nn.Parameter(v.clone())) for k, v in a.items()], 0.8)
    with pytest.raises(CheckpointError, match="written without ema_decay; resume with ema_decay=0"):
        ema.load(resumed / "checkpoint-4")
    with pytest.raises(ConfigError, match=r"other adapter settings \(ema_decay=0.8 there, 0.0 here\)"):
        train(_config(model, couplings, resumed, resume_from_checkpoint=str(full / "checkpoint-2"),
                      **RESUME_KW))


def test_ema_decay_out_of_range_is_one_line():
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"ema_decay must be in \[0, 1\)"):
            load_config(None, ema_decay=bad)
