"""Shared check: a run interrupted after step 3 and resumed from its step-2 checkpoint ends with the same LoRA
state as an uninterrupted run (4 steps, a checkpoint every 2)."""
import pytest
import torch
from safetensors.torch import load_file

from stepdistill.training.loop import TrainingInterrupted, train

RESUME_KW = dict(max_train_steps=4, checkpointing_steps=2, reflow_time_distribution="logit_normal")


def check_resume_is_exact(make_config, tmp_path):
    """``make_config(out_dir, **kw)`` -> TrainConfig. Returns the output dirs of the full and the resumed run."""
    full = train(make_config(tmp_path / "full", **RESUME_KW))
    with pytest.raises(TrainingInterrupted):
        train(make_config(tmp_path / "crashed", **RESUME_KW), interrupt_after=3)
    resumed = train(make_config(tmp_path / "crashed", resume_from_checkpoint="latest", **RESUME_KW))
    a = load_file(str(full / "checkpoint-4" / "lora_state.safetensors"))
    b = load_file(str(resumed / "checkpoint-4" / "lora_state.safetensors"))
    start = load_file(str(full / "checkpoint-2" / "lora_state.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(start[k], a[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    return full, resumed
