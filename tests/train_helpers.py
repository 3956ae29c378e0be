"""Small trainer runs on the tiny pipelines."""
from pathlib import Path

from singlora_diffusion.bundled import bundled_subject
from singlora_diffusion.training import TrainConfig


def tiny_config(base, out, **overrides) -> TrainConfig:
    settings = dict(pretrained_model_name_or_path=str(base), instance_data_dir=str(bundled_subject()),
                    instance_prompt="a photo of sks dog", output_dir=str(out), resolution=64, center_crop=True,
                    rank=2, learning_rate=1e-3, max_train_steps=4, train_batch_size=1, checkpointing_steps=100,
                    report_to="none", seed=0, num_validation_images=1, validation_inference_steps=2)
    settings.update(overrides)
    return TrainConfig(**settings)


def logged_scalars(out) -> dict[str, list]:
    """The TensorBoard scalars of the run in `out` (report_to="tensorboard"): tag -> events (.step, .value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((Path(out) / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def fixed_batch_run(base, tmp_path, monkeypatch, **options):
    """What the fixed-batch loss tests share: a trainee with class images (any photos), its objective,
    and the list every micro-batch drawn is appended to. Returns (cfg, inputs, accelerator, trainee,
    objective, draws)."""
    import shutil

    from singlora_diffusion.training import build, loop, make_accelerator, validate
    from singlora_diffusion.training.batches import TrainingData

    classes = tmp_path / "class"
    shutil.copytree(bundled_subject(), classes)
    cfg = tiny_config(base, tmp_path / "out", class_data_dir=str(classes), class_prompt="a photo of dog",
                      num_class_images=2, **options)
    inputs = validate(cfg)
    accelerator = make_accelerator(cfg)
    trainee = build(cfg, inputs, accelerator.device)
    draws = []
    real_draw = TrainingData.micro_batch
    monkeypatch.setattr(TrainingData, "micro_batch", lambda *a: draws.append(real_draw(*a)) or draws[-1])
    return cfg, inputs, accelerator, trainee, loop.make_objective(cfg, trainee.pipe, trainee.family), draws
