"""The shipped YAML presets parse into valid configs; the paper preset holds the paper's values."""
import pytest

from singlora_diffusion.bundled import bundled_subject, preset_names, preset_path
from singlora_diffusion.training.config import parse_config


def test_presets_are_shipped_in_the_package():
    assert preset_names() == ["demo", "flux", "paper_sd15", "paper_sd15_r8", "sd15", "sd35", "sdxl"]


@pytest.mark.parametrize("name", ["demo", "flux", "paper_sd15", "paper_sd15_r8", "sd15", "sd35", "sdxl"])
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


@pytest.mark.parametrize("name,arch", [("sd35", "sd3"), ("flux", "flux")])
def test_transformer_presets_train_their_family(name, arch, tiny_pipeline_dir, tmp_path):
    """Each setting of sd35.yaml / flux.yaml is one the trainer takes for that family (two steps on its
    tiny pipeline, at a tiny size); the sources' values are kept."""
    from singlora_diffusion.format import read_adapter
    from singlora_diffusion.training import train

    cfg = parse_config(["--config", name, "--pretrained_model_name_or_path", str(tiny_pipeline_dir(arch)),
                        "--instance_data_dir", str(bundled_subject()), "--output_dir", str(tmp_path),
                        "--resolution", "32", "--max_train_steps", "2", "--gradient_accumulation_steps", "1",
                        "--validation_steps", "1000", "--max_sequence_length", "16", "--report_to", "none",
                        "--mixed_precision", "no", "--seed", "0"])
    train(cfg)
    assert read_adapter(tmp_path / "singlora_weights.safetensors").metadata["base_arch"] == arch
    preset = parse_config(["--config", name])
    assert preset.weighting_scheme == ("logit_normal" if arch == "sd3" else "none")
    assert preset.max_sequence_length == (77 if arch == "sd3" else 512)
