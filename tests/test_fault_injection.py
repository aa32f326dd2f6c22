"""Fault injection (issue 12): training killed with SIGKILL at random points -- in the middle of a step, or halfway
through writing a checkpoint -- and resumed, ends with exactly the weights of an uninterrupted run; a truncated
newest checkpoint is skipped for the previous one, with the same result.

The kill points are drawn at random each run; ``STEPDISTILL_FAULT_SEED`` replays a failing draw (the seed is in
every assertion message). The killed runs are child interpreters (a SIGKILL cannot be caught or cleaned up after);
the kill hooks wrap the training loop's own functions, so they fire at exact steps."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from reliability_helpers import (
    ROOT,
    cli_env,
    save_tiny_model,
    train_kwargs,
    write_image_folder,
)
from safetensors.torch import load_file

from stepdistill.training.checkpoints import list_checkpoints
from stepdistill.training.config import load_config
from stepdistill.training.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 6

# Runs train() and SIGKILLs itself at step KILL_AT: "step" -- after the step's optimizer update, before anything of
# it is saved; "checkpoint" -- after accelerate wrote the step's checkpoint into its temporary directory, before the
# rename that publishes it.
CHILD = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from stepdistill.training import loop
from stepdistill.training.config import load_config

kwargs, kill_at, phase = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if phase == "step":
    check = loop.check_finite_loss
    def check_then_die(accelerator, loss, step, config):
        check(accelerator, loss, step, config)
        if step == kill_at:
            die()
    loop.check_finite_loss = check_then_die
else:
    save = loop.save_checkpoint
    def save_then_die(accelerator, output_dir, step, *args):
        if step == kill_at:
            accelerator.save_state(str(output_dir / f".checkpoint-{step}.tmp"))
            die()
        return save(accelerator, output_dir, step, *args)
    loop.save_checkpoint = save_then_die
loop.train(load_config(None, **kwargs))
raise SystemExit("the kill hook never fired")
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("faults")
    kw = train_kwargs(save_tiny_model(root / "tiny"), write_image_folder(root / "data"), root / "cache",
                      max_train_steps=STEPS)
    reference = train(load_config(None, output_dir=str(root / "reference"), **kw))  # also builds the shared cache
    return root, kw, reference


def _assert_same_weights(reference, out, why: str):
    for name in ("checkpoint-6/lora_state.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(str(reference / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and a, f"{why}: {name}"
        for k in a:
            assert torch.equal(a[k], b[k]), f"{why}: {name} {k} differs by {(a[k] - b[k]).abs().max()}"
    start = load_file(str(reference / "checkpoint-1" / "lora_state.safetensors"))
    end = load_file(str(reference / "checkpoint-6" / "lora_state.safetensors"))
    assert any(not torch.equal(start[k], end[k]) for k in start), "the weights never moved: a vacuous comparison"


def test_sigkill_at_random_steps_then_resume_gives_the_uninterrupted_weights(setup):
    root, kw, reference = setup
    seed = int(os.environ.get("STEPDISTILL_FAULT_SEED") or random.SystemRandom().randrange(10**6))
    rng = random.Random(seed)
    first = rng.randint(2, STEPS - 2)  # a checkpoint every step: the first kill leaves at least checkpoint-1
    second = rng.randint(first + 1, STEPS)
    kills = [(first, rng.choice(["step", "checkpoint"])), (second, rng.choice(["step", "checkpoint"]))]
    why = f"STEPDISTILL_FAULT_SEED={seed}, kills {kills}"
    out = root / f"killed-{seed}"
    for i, (step, phase) in enumerate(kills):
        args = {**kw, "output_dir": str(out), **({"resume_from_checkpoint": "latest"} if i else {})}
        res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args), str(step), phase], cwd=ROOT,
                             env=cli_env(), capture_output=True, text=True, timeout=300, check=False)
        assert res.returncode == -signal.SIGKILL, f"{why}: exit {res.returncode}\n{res.stderr[-3000:]}"
        done = [int(p.name.split("-")[1]) for p in list_checkpoints(out)]
        assert max(done) == step - 1, f"{why}: checkpoints {done}"  # step's own checkpoint never appeared
        assert not (out / "pytorch_lora_weights.safetensors").exists(), why
    resumed = train(load_config(None, output_dir=str(out), resume_from_checkpoint="latest", **kw))
    assert not list(out.glob(".checkpoint-*")), f"{why}: a leftover temporary checkpoint"
    _assert_same_weights(reference, resumed, why)


def test_truncated_newest_checkpoint_resumes_from_the_previous_one(setup):
    root, kw, reference = setup
    out = root / "truncated"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoint-6")
    (out / "pytorch_lora_weights.safetensors").unlink()
    newest = out / "checkpoint-5" / "lora_state.safetensors"
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    with pytest.warns(UserWarning, match=r"checkpoint-5/lora_state.safetensors is damaged .*checkpoint-4"):
        resumed = train(load_config(None, output_dir=str(out), resume_from_checkpoint="latest", **kw))
    _assert_same_weights(reference, resumed, "resumed from checkpoint-4")
