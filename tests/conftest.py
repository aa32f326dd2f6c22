import os

import pytest
import torch

# Two cores. In one process (`pytest tests/...`) two torch threads; under pytest-xdist (`make test`: two workers) one
# thread per worker, and one per process the tests start (OMP_NUM_THREADS), so no process spin-waits for a core the
# other worker holds. Results are deterministic at either count.
UNDER_XDIST = "PYTEST_XDIST_WORKER" in os.environ
if UNDER_XDIST:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ.get("STEPDISTILL_TEST_THREADS", "1" if UNDER_XDIST else "2")))

# The modules that take most of the suite's time, in the order a worker should start them: pytest-xdist hands out
# whole modules (`--dist loadscope --no-loadscope-reorder`) in collection order, so the demo's quality run (about
# half of the suite's CPU time) starts at once on one worker while the other works through the rest.
SLOW_MODULES_FIRST = ("test_demo_quality.py", "test_distributed.py", "test_docs.py", "test_reliability.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's tests keep their order


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
