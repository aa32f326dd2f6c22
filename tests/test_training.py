"""The training loop's mechanics on a tiny random SD-shaped pipeline: exact resume, atomic checkpoints with
rotation, and the LoRA it writes arriving intact in stock diffusers."""
import json

import pytest
import torch
from safetensors.torch import load_file

from stepdistill import lora
from stepdistill.errors import ConfigError
from stepdistill.training.config import load_config
from stepdistill.errors import DataError
from stepdistill.training.loop import TrainingInterrupted, list_checkpoints, train


def _config(model, out, **kw):
    base = dict(pretrained_model=model, output_dir=str(out), train_data="toy:48", lora_rank=4, train_batch_size=4,
                max_train_steps=4, checkpointing_steps=2, learning_rate=1e-3, validation_steps=0, report_to="none",
                cache_dir=str(out) + "-cache", w_min=1.0, w_max=3.0)
    base.update(kw)
    return load_config(None, **base)


def test_resume_after_crash_gives_identical_weights(tiny_model_dir, tmp_path):
    full = train(_config(tiny_model_dir, tmp_path / "full"))
    with pytest.raises(TrainingInterrupted):
        train(_config(tiny_model_dir, tmp_path / "crashed"), interrupt_after=3)  # step 3 is lost
    assert [p.name for p in list_checkpoints(tmp_path / "crashed")] == ["checkpoint-2"]
    resumed = train(_config(tiny_model_dir, tmp_path / "crashed", resume_from_checkpoint="latest"))
    a = load_file(str(full / "checkpoint-4" / "lora_state.safetensors"))
    b = load_file(str(resumed / "checkpoint-4" / "lora_state.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # the weights moved away from the start, so the comparison is not between two untouched adapters
    start = load_file(str(tmp_path / "crashed" / "checkpoint-2" / "lora_state.safetensors"))
    assert any(not torch.equal(start[k], a[k]) for k in a)


def test_checkpoint_rotation_and_no_partial_checkpoints(tiny_model_dir, tmp_path):
    out = train(_config(tiny_model_dir, tmp_path / "rot", max_train_steps=6, checkpointing_steps=1,
                        checkpoints_total_limit=2))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-5", "checkpoint-6"]
    assert not list(out.glob(".checkpoint-*"))
    assert json.loads((out / "checkpoint-6" / "stepdistill_step.json").read_text()) == {"global_step": 6}


def test_trained_lora_loads_in_stock_diffusers_layer_by_layer(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = train(_config(tiny_model_dir, tmp_path / "rt", max_train_steps=2, checkpointing_steps=2))
    trained = load_file(str(out / "checkpoint-2" / "lora_state.safetensors"))  # fp32, as trained
    file = out / "pytorch_lora_weights.safetensors"
    sd, metadata, fmt = lora.read_lora(file)
    assert fmt == "kohya" and all(k.startswith("lora_unet_") for k in sd)
    assert metadata["stepdistill.method"] == "lcd" and metadata["ss_network_dim"] == "4"

    stock = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    stock.load_lora_weights(str(out), adapter_name="accel")
    report = lora.verify_lora_loaded(stock, file, "accel")
    n_modules = len({k.rsplit(".lora_", 1)[0] for k in trained})
    assert report.loaded == report.expected == n_modules > 50

    # identical outputs: stock-loaded file vs the fp32 weights the training loop held
    from peft.utils import set_peft_model_state_dict
    reference = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    lora.add_lora_to_unet(reference.unet, rank=4, alpha=4)
    set_peft_model_state_dict(reference.unet, trained)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    ctx = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = stock.unet(x, t, ctx).sample, reference.unet(x, t, ctx).sample
        base = StableDiffusionPipeline.from_pretrained(tiny_model_dir).unet(x, t, ctx).sample
    assert (want - base).abs().max() > 1e-3  # the adapter changes the output ...
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # ... identically after the round trip


def test_unknown_config_key_is_named_with_a_suggestion(tmp_path):
    (tmp_path / "c.yaml").write_text("lora_rnak: 8\n")
    with pytest.raises(ConfigError, match="lora_rnak.*did you mean 'lora_rank'"):
        load_config(tmp_path / "c.yaml")


def test_missing_captions_are_reported_with_the_fix(tmp_path):
    from stepdistill.data.sources import load_examples
    from stepdistill.toy.scenes import write_image_folder

    write_image_folder(tmp_path, 3, seed=0)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "000001.txt").unlink()
    with pytest.raises(DataError, match="1 of 3 images .* no caption file .*000001.png"):
        load_examples(str(tmp_path))


def test_unreadable_image_and_bad_resolution(tmp_path):
    from stepdistill.data.sources import check_resolution, load_examples

    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "bad.txt").write_text("a small red circle")
    ex = load_examples(str(tmp_path))
    with pytest.raises(DataError, match="cannot read image .*bad.png"):
        ex[0].load_image()
    with pytest.raises(DataError, match="multiple of 16.*use 32 or 48"):
        check_resolution(40, 16)
