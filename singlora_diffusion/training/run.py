"""train(cfg): validate -> build -> (class images) -> fit -> save. What train_dreambooth.py calls."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import torch

from ..errors import WriteError
from ..files import atomic_path, write_text
from .build import Inputs, Trainee, build, encode_prompts_once, validate
from .card import optimizer_line
from .dataset import num_class_images
from .checkpoint import reconcile_resume, resolve_resume, write_failure
from .config import TrainConfig
from .loop import fit
from .weights import write_final


def generate_class_images(cfg: TrainConfig, trainee: Trainee, inputs: Inputs, accelerator) -> None:
    """Top each concept's class folder up to its num_class_images with the base model (adapters off).

    Existing images are kept, so an interrupted generation resumes where it stopped.
    """
    from ..adapters import adapters_off
    from ..generate import render
    from ..images import scan_images

    for c, concept in enumerate(inputs.concepts):
        wanted, have = num_class_images(cfg, concept), len(inputs.class_images[c])
        if wanted > have and accelerator.is_main_process:
            folder = Path(concept.class_data_dir)
            print(f"generating {wanted - have} class images for '{concept.class_prompt}' in {folder}")
            # The base model's prior: every adapter off, text encoders' included (A·Aᵀ is not zero at
            # initialisation, so a fresh adapter already changes the class-prompt embedding).
            with adapters_off(trainee.pipe):
                for first in range(have, wanted, cfg.sample_batch_size):
                    n = min(cfg.sample_batch_size, wanted - first)
                    images = render(trainee.pipe, concept.class_prompt, seed=cfg.seed * 1_000_003 + first,
                                    steps=cfg.validation_inference_steps, num_images=n,
                                    width=cfg.resolution, height=cfg.resolution)
                    for i, image in enumerate(images):
                        # whole or absent: a half-written PNG would be skipped as corrupt by the next run
                        with atomic_path(folder / f"class-{first + i:05d}.png") as tmp:
                            image.save(tmp, format="PNG")
    accelerator.wait_for_everyone()
    for c, concept in enumerate(inputs.concepts):
        found = scan_images(concept.class_data_dir, "--class_data_dir", "class images")
        inputs.class_images[c] = found[: num_class_images(cfg, concept)]


def image_lines(cfg: TrainConfig, inputs: Inputs) -> list[str]:
    """The summary's lines on the data: each concept's images, and the buckets' sizes."""
    lines = []
    for c, concept in enumerate(inputs.concepts):
        n = len({item.path for item in inputs.items if item.concept == c})
        line = f"{n} instance{f' x {concept.repeats} repeats' if concept.repeats > 1 else ''} " \
               f"({concept.instance_data_dir}, '{concept.instance_prompt}')"
        if cfg.with_prior_preservation:
            line += f", {len(inputs.class_images[c])} class"
        lines.append(f" {'images' if c == 0 else '':11s} {line}")
    if cfg.enable_bucket:
        sizes = Counter(item.size for item in inputs.items)
        lines.append(" buckets     " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(sizes.items())))
    return lines


def summary(cfg: TrainConfig, trainee: Trainee, inputs: Inputs, accelerator, freed: list[str] = ()) -> str:
    n_params = sum(p.numel() for p in trainee.parameters())
    lines = [
        "=" * 72,
        f" base        {cfg.pretrained_model_name_or_path} ({type(trainee.pipe).__name__})",
        f" adapter     {cfg.adapter}, rank {cfg.rank}, alpha {cfg.alpha:g}, ramp T = {trainee.ramp_up_steps} steps",
        f" targets     {trainee.denoiser_name}: {cfg.target_modules}"
        + ("" if cfg.text_encoder_target_modules is None else f"; text encoders: {cfg.text_encoder_target_modules}"),
        f" trainable   {n_params:,} parameters",
        *image_lines(cfg, inputs),
        f" steps       {cfg.max_train_steps} x batch {cfg.train_batch_size} x accumulation "
        f"{cfg.gradient_accumulation_steps} x {accelerator.num_processes} process(es)",
        f" optimizer   {optimizer_line(cfg).removeprefix('optimizer ')}; lr {cfg.learning_rate:g}",
        f" precision   base {cfg.mixed_precision}, adapter float32; seed {cfg.seed}",
        *([f" compiled    torch.compile, {trainee.compiled}: the first step compiles"] if trainee.compiled else []),
        *([" memory      channels-last"] if cfg.channels_last else []),
        " prompts     " + (f"encoded once, then {', '.join(freed)} freed" if freed else
                            "encoded every step (a text encoder trains, or --cache_text_embeddings false)"),
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


def train(cfg: TrainConfig, model_card: bool = True) -> dict[str, Path]:
    """The whole job; returns the files written (empty on an interrupted run).

    model_card=False skips README.md and its samples.png (base vs adapter renders): the grid's
    cells are scored by the evaluation instead, and the renders would cost GPU time per cell.
    """
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
    freed = encode_prompts_once(cfg, trainee, inputs)
    if accelerator.is_main_process:
        print(summary(cfg, trainee, inputs, accelerator, freed))
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
        if model_card:
            files.update(write_model_card(cfg, trainee, output_dir, dict(files), inputs.concepts))
        print("files written:")
        for name, path in files.items():
            print(f"  {name:11s} {path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if result.interrupted:
        raise KeyboardInterrupt
    return files


def main(argv: list[str] | None = None) -> int:
    import signal

    from ..dataclass_cli import run_command
    from .config import parse_config

    # SIGINT is the trainer's "checkpoint and stop" (Ctrl-C, the web UI's cancel). A process started
    # with SIGINT ignored (a shell script's background job, and everything it starts: a web UI
    # launched with `&` included) inherits the ignore, and Python then installs no KeyboardInterrupt:
    # cancel would do nothing while the run went on for hours.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return run_command("train_dreambooth.py", lambda: train(parse_config(argv)))
