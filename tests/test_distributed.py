"""Two processes on CPU (gloo, ``torchrun``): LCD and reflow on a tiny SD pipeline train the same adapter on both
ranks, resume exactly after an interruption, and record the engine in the model card. (One process: the same
checks in tests/test_training.py and tests/test_reflow_training.py, via tests/resume_check.py.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import PROMPTS

from stepdistill.methods import reflow_couplings as RC

HERE = Path(__file__).resolve().parent
RUN = {"lora_rank": 2, "train_batch_size": 2, "max_train_steps": 4, "checkpointing_steps": 2, "learning_rate": 1e-3,
       "validation_steps": 0, "report_to": "none", "reflow_time_distribution": "logit_normal"}


def launch(tmp_path: Path, config: dict, nproc: int = 2, interrupt_after: int | None = None):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"config": config, "interrupt_after": interrupt_after}))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(HERE / "distributed_worker.py"), str(spec)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def full_crashed_resumed(tmp_path: Path, config: dict) -> Path:
    """An uninterrupted 2-process run (4 steps, a checkpoint every 2), and a run resumed from its checkpoint 2: a
    copy of its directory as a crash after step 3 would leave it (checkpoint 2, no checkpoint 4, no adapter; an
    interrupted run writes the same checkpoint 2, as tests/resume_check.py checks with a real interruption)."""
    out = tmp_path / "runs"
    launch(tmp_path, dict(config, output_dir=str(out / "full")))
    shutil.copytree(out / "full", out / "crashed")
    shutil.rmtree(out / "crashed" / "checkpoint-4")
    for name in ("pytorch_lora_weights.safetensors", "stepdistill_card.json", "README.md"):
        (out / "crashed" / name).unlink()
    launch(tmp_path, dict(config, output_dir=str(out / "crashed"), resume_from_checkpoint="latest"))
    return out


def check_ranks_and_resume(out: Path):
    for run in ("full", "crashed"):  # both ranks end with the same adapter (DDP averaged the gradients)
        a, b = (load_file(str(out / run / f"params-rank{r}.safetensors")) for r in (0, 1))
        assert a.keys() == b.keys() and len(a) > 10
        for k in a:
            assert torch.equal(a[k], b[k]), (run, k)
    full = load_file(str(out / "full" / "checkpoint-4" / "lora_state.safetensors"))
    resumed = load_file(str(out / "crashed" / "checkpoint-4" / "lora_state.safetensors"))
    start = load_file(str(out / "full" / "checkpoint-2" / "lora_state.safetensors"))
    assert full.keys() == resumed.keys() and any(not torch.equal(start[k], full[k]) for k in full)
    for k in full:
        torch.testing.assert_close(full[k], resumed[k], rtol=0, atol=1e-6, msg=k)
    card = json.loads((out / "full" / "stepdistill_card.json").read_text())
    assert card["num_processes"] == 2 and card["distributed_type"] == "MULTI_CPU"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from stepdistill.toy.teacher import build_random_pipeline

    path = tmp_path_factory.mktemp("tiny") / "tiny-sd"
    pipe = build_random_pipeline(seed=0)
    pipe.save_pretrained(path)
    return pipe, str(path)


def test_lcd_two_processes_agree_and_resume_exactly(tiny_model, tmp_path):
    """With ``ema_decay``: both ranks end holding the same moving average (what the run writes), and the resumed
    run's checkpoint carries the same average as the uninterrupted run's."""
    _, model = tiny_model
    out = full_crashed_resumed(tmp_path, dict(RUN, pretrained_model=model, train_data="toy:12", cache_dir=str(tmp_path / "cache"),
                                w_min=1.0, w_max=3.0, ema_decay=0.9))
    check_ranks_and_resume(out)
    full, resumed = (load_file(str(out / run / "checkpoint-4" / "ema_state.safetensors")) for run in ("full", "crashed"))
    trained = load_file(str(out / "full" / "checkpoint-4" / "lora_state.safetensors"))
    assert full.keys() == resumed.keys() and len(full) == len(trained)
    for k in full:
        torch.testing.assert_close(full[k], resumed[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(full[k], trained[k.replace(".default", "")]) for k in full)
    assert json.loads((out / "full" / "stepdistill_card.json").read_text())["ema_decay"] == 0.9


def test_reflow_two_processes_agree_and_resume_exactly(tiny_model, tmp_path):
    pipe, model = tiny_model
    RC.generate_couplings(pipe, PROMPTS, tmp_path / "couplings", num_steps=2, num_windows=2, guidance_scale=3.0,
                          model_id=model, progress=False)
    config = dict(RUN, method="reflow", pretrained_model=model, couplings_dir=str(tmp_path / "couplings"),
                  reflow_windows=2, validation_couplings_dir=str(tmp_path / "couplings"), validation_batches=3,
                  lora_dropout=0.2)  # each rank's masks repeat on resume
    out = full_crashed_resumed(tmp_path, config)
    check_ranks_and_resume(out)
    # the held-out loss, measured by two processes (3 batches: one process runs a spare, uncounted forward),
    # equals one process's measurement of the same adapter, and the resumed run measures the same
    import contextlib
    import types

    from peft.utils import set_peft_model_state_dict

    from stepdistill import lora
    from stepdistill.methods.reflow import ReflowObjective
    from stepdistill.models.pipeline import load_pipeline
    from stepdistill.training.config import load_config
    from stepdistill.training.heldout import heldout_loss
    from stepdistill.training.loop import lora_target_modules

    cards = [json.loads((out / run / "stepdistill_card.json").read_text()) for run in ("full", "crashed")]
    assert cards[0]["heldout_loss"] == pytest.approx(cards[1]["heldout_loss"], rel=1e-5)
    cfg = load_config(None, **dict(config, output_dir=str(tmp_path / "unused")))
    one = load_pipeline(model)
    lora.add_lora_to_unet(one.unet, rank=cfg.lora_rank, alpha=cfg.lora_rank,
                          target_modules=lora_target_modules(cfg, one.unet))
    set_peft_model_state_dict(one.unet, load_file(str(out / "full" / "checkpoint-4" / "lora_state.safetensors")))
    accel = types.SimpleNamespace(device=torch.device("cpu"), main_process_first=contextlib.nullcontext,
                                  process_index=0, num_processes=1)
    alone = heldout_loss(accel, one.unet, ReflowObjective(cfg, one, accel), cfg)
    assert alone == pytest.approx(cards[0]["heldout_loss"], rel=1e-4, abs=1e-6)


def test_adversarial_dmd_streaming_two_processes_agree_and_resume_exactly(tiny_model, tmp_path):
    """method: adversarial with the GAN and DMD terms, on streamed WebDataset shards, under 2 processes x 1
    DataLoader worker. The discriminator heads and the fake score (not wrapped by accelerate) have their gradients
    averaged by hand, each rank reads its own resampled shard stream, and a checkpoint gathers both ranks' stream
    positions: both ranks end with the same adapter and a resumed run continues exactly."""
    from test_streaming import write_shards

    _, model = tiny_model
    shards = write_shards(tmp_path / "wds", n_shards=3, per_shard=4)
    out = full_crashed_resumed(tmp_path, dict(RUN, method="adversarial", pretrained_model=model, train_data=shards,
                                              data_mode="streaming", dataloader_num_workers=1, w_min=1.0, w_max=3.0,
                                              disc_head_channels=8, gan_loss_weight=0.5, dmd_loss_weight=1.0,
                                              dmd_fake_rank=2))
    check_ranks_and_resume(out)
    assert not (out / "full" / "cache").exists()  # streamed: nothing cached
    disc, fake, stream = (torch.load(out / "full" / "checkpoint-4" / f"custom_checkpoint_{i}.pkl",
                                     weights_only=False) for i in (0, 1, 2))
    assert disc["heads"] and len(fake["lora"]) > 10  # the heads and the fake score are checkpointed
    assert stream["positions"].shape == (2, 1, 2) and stream["positions"][:, 0, :].sum() > 0
