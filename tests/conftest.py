import os

import pytest
import torch

# Two cores: one torch thread per test process avoids oversubscription; results stay deterministic.
torch.set_num_threads(int(os.environ.get("STEPDISTILL_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def toy_pipe():
    from stepdistill.sampling import load_pipeline

    return load_pipeline("toy", device="cpu")


@pytest.fixture
def tiny_random_pipe():
    """An SD-shaped pipeline with random weights (fresh per test), built from the toy builders."""
    from diffusers import StableDiffusionPipeline

    from stepdistill.toy import models
    from stepdistill.toy.tokenizer import build_toy_tokenizer

    torch.manual_seed(0)
    tok = build_toy_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=models.build_vae(), text_encoder=models.build_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id,
                                                                       tok.pad_token_id),
        tokenizer=tok, unet=models.build_unet(), scheduler=models.build_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
