from pathlib import Path

import pytest

from stepdistill.training.config import TrainConfig, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads_with_known_keys(path):
    assert isinstance(load_config(path), TrainConfig)


def test_toy_recipes_are_the_packaged_ones_the_demo_runs():
    """configs/toy-*.yaml are links to the recipes the package ships (stepdistill/toy/recipes), which the demo
    reads: one copy of each recipe."""
    from stepdistill.toy.world import toy_recipe

    for name in ("lcm-lora", "reflow", "reflow-onestep", "adversarial", "adversarial-reflow"):
        link = Path(__file__).parent.parent / "configs" / f"toy-{name}.yaml"
        assert link.resolve() == toy_recipe(name).resolve()
        assert isinstance(load_config(toy_recipe(name)), TrainConfig)


@pytest.mark.parametrize("name", ["sd15-lcm-lora.yaml", "sd21-lcm-lora.yaml", "sdxl-lcm-lora.yaml"])
def test_published_lcm_lora_defaults(name):
    c = load_config(Path(__file__).parent.parent / "configs" / name)
    assert (c.lora_rank, c.learning_rate, c.num_ddim_timesteps, c.w_min, c.w_max) == (64, 1e-4, 50, 5.0, 15.0)
    assert len(c.lora_target_modules) == 14 and c.loss_type == "huber" and c.huber_c == 0.001


@pytest.mark.parametrize("name", ["sd15-reflow.yaml", "sdxl-reflow.yaml", "sd3-reflow.yaml", "flux-reflow.yaml"])
def test_published_reflow_recipes_are_piecewise_with_four_windows(name):
    c = load_config(Path(__file__).parent.parent / "configs" / name)
    assert c.method == "reflow" and c.reflow_windows == 4 and c.couplings_dir


def test_overrides_may_follow_options_on_the_command_line():
    from stepdistill.cli import parse_args

    args = parse_args(["reflow", "train", "configs/toy-reflow.yaml", "--couplings", "c", "reflow_windows=1", "seed=3"])
    assert args.config == "configs/toy-reflow.yaml" and args.couplings == "c"
    assert args.overrides == ["reflow_windows=1", "seed=3"]
    args = parse_args(["distill", "--config", "x.yaml", "max_train_steps=5"])
    assert args.overrides == ["max_train_steps=5"]
    with pytest.raises(SystemExit):
        parse_args(["reflow", "train", "--couplings", "c", "--no-such-flag"])
