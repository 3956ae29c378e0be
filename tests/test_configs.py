"""The shipped YAML presets parse into valid configs; the paper preset holds the paper's values."""
from pathlib import Path

import pytest

from singlora_diffusion.training.config import parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["demo", "paper_sd15", "paper_sd15_r8", "sd15", "sdxl"])
def test_config_parses(name):
    cfg = parse_config(["--config", str(CONFIGS / f"{name}.yaml")])
    assert cfg.instance_prompt and cfg.pretrained_model_name_or_path


@pytest.mark.parametrize("name,rank", [("paper_sd15", 16), ("paper_sd15_r8", 8)])
def test_paper_presets(name, rank):
    cfg = parse_config(["--config", str(CONFIGS / f"{name}.yaml")])
    assert (cfg.pretrained_model_name_or_path, cfg.target_modules, cfg.rank, cfg.learning_rate,
            cfg.max_train_steps) == ("runwayml/stable-diffusion-v1-5", "paper", rank, 1e-3, 400)
    assert cfg.instance_prompt == "a photo of sks dog" and cfg.alpha == rank
    assert cfg.resolved_ramp_up_steps(cfg.max_train_steps) == 4  # 1 % of 400
