"""The shipped YAML presets parse into valid configs; the paper preset holds the paper's values."""
import pytest

from singlora_diffusion.bundled import bundled_subject, preset_names, preset_path
from singlora_diffusion.training.config import parse_config


def test_presets_are_shipped_in_the_package():
    assert preset_names() == ["demo", "paper_sd15", "paper_sd15_r8", "sd15", "sdxl"]


@pytest.mark.parametrize("name", ["demo", "paper_sd15", "paper_sd15_r8", "sd15", "sdxl"])
def test_config_parses_by_name_and_by_path(name):
    cfg = parse_config(["--config", name])
    assert cfg.instance_prompt and cfg.pretrained_model_name_or_path
    assert parse_config(["--config", str(preset_path(name))]) == cfg


def test_demo_trains_the_toy_base_on_the_bundled_toy_subject_wherever_it_runs():
    cfg = parse_config(["--config", "demo"])
    assert cfg.instance_data_dir == str(bundled_subject("toy_subject"))
    assert (cfg.pretrained_model_name_or_path, cfg.caption_extension, cfg.resolution) == ("toy:shapes", ".txt", 32)


@pytest.mark.parametrize("name,rank", [("paper_sd15", 16), ("paper_sd15_r8", 8)])
def test_paper_presets(name, rank):
    cfg = parse_config(["--config", name])
    assert (cfg.pretrained_model_name_or_path, cfg.target_modules, cfg.rank, cfg.learning_rate,
            cfg.max_train_steps) == ("runwayml/stable-diffusion-v1-5", "paper", rank, 1e-3, 400)
    assert cfg.instance_prompt == "a photo of sks dog" and cfg.alpha == rank
    assert cfg.resolved_ramp_up_steps(cfg.max_train_steps) == 4  # 1 % of 400
