import os

import pytest
import torch

# Two cores: one torch thread per test process avoids oversubscription; results stay deterministic.
torch.set_num_threads(int(os.environ.get("STEPDISTILL_TEST_THREADS", "2")))


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of small kernels (ODE loops on tiny models): on a 2-core machine shared with another job, two
    threads oversubscribe the cores and spin-wait (such loops ran ~30x slower). One thread for the module, restored
    afterwards. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_pipe():
    from stepdistill.models.pipeline import load_pipeline

    return load_pipeline("toy", device="cpu")


@pytest.fixture
def tiny_random_pipe():
    """An SD-shaped pipeline with random weights (fresh per test), built from the toy builders."""
    from stepdistill.toy.teacher import build_random_pipeline

    pipe = build_random_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_model_dir(tiny_random_pipe, tmp_path):
    """``tiny_random_pipe`` saved as a pipeline directory (what ``pretrained_model`` takes)."""
    path = tmp_path / "tiny-sd"
    tiny_random_pipe.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_setup(tiny_model_dir, tiny_random_pipe, tmp_path):
    """``tiny_model_dir`` and K=2 couplings from it: ``(model directory, couplings directory)``."""
    from stepdistill.methods import reflow_couplings as RC
    from tiny_models import PROMPTS

    RC.generate_couplings(tiny_random_pipe, PROMPTS, tmp_path / "couplings", num_steps=4, num_windows=2,
                          guidance_scale=3.0, model_id=tiny_model_dir, progress=False)
    return tiny_model_dir, str(tmp_path / "couplings")
