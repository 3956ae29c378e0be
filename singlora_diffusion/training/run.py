"""train(cfg): validate -> build -> (class images) -> fit -> save. What train_dreambooth.py calls."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from ..errors import WriteError
from ..files import atomic_path, write_text
from .build import Inputs, Trainee, build, validate
from .checkpoint import reconcile_resume, resolve_resume, write_failure
from .config import TrainConfig
from .loop import fit
from .weights import write_final


def generate_class_images(cfg: TrainConfig, trainee: Trainee, inputs: Inputs, accelerator) -> None:
    """Top the class folder up to num_class_images with the base model (adapters off).

    Existing images are kept, so an interrupted generation resumes where it stopped.
    """
    from ..adapters import adapters_off
    from ..generate import render
    from ..images import scan_images

    missing = cfg.num_class_images - len(inputs.class_images)
    if missing > 0 and accelerator.is_main_process:
        folder = Path(cfg.class_data_dir)
        print(f"generating {missing} class images for '{cfg.class_prompt}' in {folder}")
        start = len(inputs.class_images)
        # The base model's prior: every adapter off, text encoders' included (A·Aᵀ is not zero at
        # initialisation, so a fresh adapter already changes the class-prompt embedding).
        with adapters_off(trainee.pipe):
            for first in range(start, cfg.num_class_images, cfg.sample_batch_size):
                n = min(cfg.sample_batch_size, cfg.num_class_images - first)
                images = render(trainee.pipe, cfg.class_prompt, seed=cfg.seed * 1_000_003 + first,
                                steps=cfg.validation_inference_steps, num_images=n,
                                width=cfg.resolution, height=cfg.resolution)
                for i, image in enumerate(images):
                    # whole or absent: a half-written PNG would be skipped as corrupt by the next run
                    with atomic_path(folder / f"class-{first + i:05d}.png") as tmp:
                        image.save(tmp, format="PNG")
    accelerator.wait_for_everyone()
    if cfg.with_prior_preservation:
        found = scan_images(cfg.class_data_dir, "--class_data_dir", "class images")
        inputs.class_images = found[: cfg.num_class_images]


def summary(cfg: TrainConfig, trainee: Trainee, inputs: Inputs, accelerator) -> str:
    n_params = sum(p.numel() for p in trainee.parameters())
    lines = [
        "=" * 72,
        f" base        {cfg.pretrained_model_name_or_path} ({type(trainee.pipe).__name__})",
        f" adapter     {cfg.adapter}, rank {cfg.rank}, alpha {cfg.alpha:g}, ramp T = {trainee.ramp_up_steps} steps",
        f" targets     unet: {cfg.target_modules}"
        + ("" if cfg.text_encoder_target_modules is None else f"; text encoders: {cfg.text_encoder_target_modules}"),
        f" trainable   {n_params:,} parameters",
        f" images      {len(inputs.instance_images)} instance ({cfg.instance_data_dir})"
        + (f", {len(inputs.class_images)} class" if cfg.with_prior_preservation else ""),
        f" steps       {cfg.max_train_steps} x batch {cfg.train_batch_size} x accumulation "
        f"{cfg.gradient_accumulation_steps} x {accelerator.num_processes} process(es), lr {cfg.learning_rate:g}",
        f" precision   base {cfg.mixed_precision}, adapter float32; seed {cfg.seed}",
        f" output      {cfg.output_dir}",
        "=" * 72,
    ]
    return "\n".join(lines)


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    # accelerate keeps its settings in process-wide singletons; a second train()
    # in the same process (web UI, tests) may use another precision/accumulation.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
        cpu=not torch.cuda.is_available())
    if cfg.mixed_precision == "fp16" and accelerator.scaler is None:
        # accelerate scales fp16 losses on GPUs only. Gradients through an fp16 base
        # underflow on any device, so the CPU gets the same GradScaler (set before
        # prepare_optimizer, which hands it to the optimizer): one code path everywhere.
        accelerator.scaler = torch.amp.GradScaler(accelerator.device.type)
        accelerator.native_amp = True
    return accelerator


def train(cfg: TrainConfig) -> dict[str, Path]:
    """The whole job; returns the files written (empty on an interrupted run)."""
    from .card import write_model_card

    inputs = validate(cfg)  # before any model is loaded
    if cfg.seed is None:
        cfg.seed = random.SystemRandom().randrange(2 ** 31)  # drawn once, saved in config.yaml
    accelerator = make_accelerator(cfg)
    output_dir = Path(cfg.output_dir)
    resume = resolve_resume(output_dir, cfg.resume_from_checkpoint, cfg,
                            log=print if accelerator.is_main_process else lambda line: None)
    if resume is not None:
        note = reconcile_resume(cfg, resume)
        if note and accelerator.is_main_process:
            print(note)
    # config.yaml holds the ramp length actually used, so the run can be repeated from it
    cfg.ramp_up_steps = cfg.resolved_ramp_up_steps(cfg.max_train_steps)
    if accelerator.is_main_process:
        write_text(output_dir / "config.yaml", cfg.to_yaml())
    trainee = build(cfg, inputs, accelerator.device)
    if cfg.with_prior_preservation:
        generate_class_images(cfg, trainee, inputs, accelerator)
    if accelerator.is_main_process:
        print(summary(cfg, trainee, inputs, accelerator))
    accelerator.init_trackers("singlora-dreambooth", config={k: v for k, v in vars(cfg).items()
                                                             if isinstance(v, (int, float, str, bool))})
    result = fit(cfg, trainee, inputs, accelerator, resume=resume)
    files: dict[str, Path] = {}
    if not result.interrupted and accelerator.is_main_process:
        try:
            files = write_final(trainee, output_dir, cfg.pretrained_model_name_or_path, cfg)
        except OSError as e:
            raise WriteError(f"could not write the final adapter in {output_dir} ({write_failure(e)}); the last "
                             f"checkpoint, {result.last_checkpoint}, is complete: free space, then resume from it") from None
        files["config"] = output_dir / "config.yaml"
        files["checkpoint"] = result.last_checkpoint
        files.update(write_model_card(cfg, trainee, output_dir, weights=dict(files)))
        print("files written:")
        for name, path in files.items():
            print(f"  {name:11s} {path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if result.interrupted:
        raise KeyboardInterrupt
    return files


def main(argv: list[str] | None = None) -> int:
    from ..dataclass_cli import run_command
    from .config import parse_config

    return run_command("train_dreambooth.py", lambda: train(parse_config(argv)))
