"""Small trainer runs on the tiny pipelines."""
from singlora_diffusion.bundled import bundled_subject
from singlora_diffusion.training.config import TrainConfig


def tiny_config(base, out, **overrides) -> TrainConfig:
    settings = dict(pretrained_model_name_or_path=str(base), instance_data_dir=str(bundled_subject()),
                    instance_prompt="a photo of sks dog", output_dir=str(out), resolution=64, center_crop=True,
                    rank=2, learning_rate=1e-3, max_train_steps=4, train_batch_size=1, checkpointing_steps=100,
                    report_to="none", seed=0, num_validation_images=1, validation_inference_steps=2)
    settings.update(overrides)
    return TrainConfig(**settings)
