from pathlib import Path

import pytest
import yaml

from stepdistill.config import TrainConfig, load_config
from stepdistill.demo import TOY_LCD_RECIPE

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads_with_known_keys(path):
    assert isinstance(load_config(path), TrainConfig)


def test_toy_lcm_recipe_file_matches_the_demo():
    data = yaml.safe_load((Path(__file__).parent.parent / "configs" / "toy-lcm-lora.yaml").read_text())
    data.pop("output_dir", None)
    assert data == TOY_LCD_RECIPE


@pytest.mark.parametrize("name", ["sd15-lcm-lora.yaml", "sd21-lcm-lora.yaml", "sdxl-lcm-lora.yaml"])
def test_published_lcm_lora_defaults(name):
    c = load_config(Path(__file__).parent.parent / "configs" / name)
    assert (c.lora_rank, c.learning_rate, c.num_ddim_timesteps, c.w_min, c.w_max) == (64, 1e-4, 50, 5.0, 15.0)
    assert len(c.lora_target_modules) == 14 and c.loss_type == "huber" and c.huber_c == 0.001
