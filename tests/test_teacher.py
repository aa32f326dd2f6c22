"""The committed toy teacher is a drop-in for SD 1.5 tooling."""
import json

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from stepdistill.toy.world import TOY_TEACHER_DIR, toy_teacher_path


def test_loads_with_stock_stable_diffusion_pipeline_and_samples():
    pipe = StableDiffusionPipeline.from_pretrained(toy_teacher_path())
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    out = pipe(["a large red circle in the center on a white background"] * 2, num_inference_steps=10,
               guidance_scale=5.0, generator=g, output_type="np").images
    assert out.shape == (2, 64, 64, 3) and np.isfinite(out).all()
    assert out.std() > 0.05  # an image, not a flat field


def test_sd15_drop_in_configuration():
    model_index = json.loads((TOY_TEACHER_DIR / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionPipeline"
    unet = json.loads((TOY_TEACHER_DIR / "unet" / "config.json").read_text())
    vae = json.loads((TOY_TEACHER_DIR / "vae" / "config.json").read_text())
    sched = json.loads((TOY_TEACHER_DIR / "scheduler" / "scheduler_config.json").read_text())
    text = json.loads((TOY_TEACHER_DIR / "text_encoder" / "config.json").read_text())
    assert unet["in_channels"] == 4 and vae["latent_channels"] == 4
    assert 0 < vae["scaling_factor"] < 10 and vae["scaling_factor"] != 1.0  # measured, not the default
    assert text["max_position_embeddings"] == 77 and unet["cross_attention_dim"] == text["hidden_size"]
    assert (sched["num_train_timesteps"], sched["beta_start"], sched["beta_end"], sched["beta_schedule"],
            sched["prediction_type"]) == (1000, 0.00085, 0.012, "scaled_linear", "epsilon")


def test_committed_weights_are_small():
    total = sum(p.stat().st_size for p in TOY_TEACHER_DIR.rglob("*") if p.is_file())
    assert total < 20 * 2**20  # tens of MB at most (issue 9): 15 MB fp32 today
