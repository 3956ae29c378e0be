"""Phase 3: the training loop, checkpoints, validation, Ctrl-C and NaN handling."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..inject import attach_ramp, singlora_modules
from ..layer import ramp
from ..errors import UserError
from .batches import LatentSource, PromptEncoder, sample_indices, seed_sample
from .build import Inputs, Trainee
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .loss import draw_noise, dreambooth_loss, per_sample_mse, snr_weights, target_of
from .weights import read_weights, write_weights


PROGRESS_FILE = "progress.json"  # step, loss, latest validation image: read by the web UI


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN/Inf: the user lowers the learning rate or resumes from an earlier checkpoint."""


def write_progress(output_dir: Path, **fields) -> None:
    tmp = output_dir / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps(fields))
    os.replace(tmp, output_dir / PROGRESS_FILE)  # readers never see half a file


@dataclass
class FitResult:
    step: int
    last_checkpoint: Path | None
    interrupted: bool = False
    validation_images: list[Path] | None = None


def make_optimizer(cfg: TrainConfig, params):
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    # foreach: one fused update over the many small adapter tensors (also on CPU)
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, foreach=True, **kwargs)


def ramp_value(trainee: Trainee):
    """A function giving the current u(t) (1.0 for LoRA/DoRA); the module is looked up once."""
    if trainee.adapter != "singlora":
        return lambda: 1.0
    m = next(iter(singlora_modules(trainee.pipe.unet).values()))
    return lambda: float(ramp(m.singlora_step, m.ramp_up_steps))


def draw_samples(cfg: TrainConfig, source: LatentSource, stream: str, first: int, num_train_timesteps: int):
    """Samples first .. first + batch - 1 of one stream: (VAE latents, time ids, noise, timesteps).

    Each sample's draws come from its own seed (batches.seed_sample), in a fixed order.
    """
    image_seed = cfg.seed + (1 if stream == "class" else 0)
    latents, time_ids, noises, timesteps = [], [], [], []
    for s in range(first, first + cfg.train_batch_size):
        seed_sample(cfg.seed, stream, s)
        latent, time_id = source.get(sample_indices(len(source.paths), s, 1, image_seed)[0])
        noise, t = draw_noise(tuple(latent.shape), cfg.noise_offset, num_train_timesteps)
        latents.append(latent)
        time_ids.append(time_id)
        noises.append(noise)
        timesteps.append(t)
    return source.scale(torch.stack(latents)), torch.tensor(time_ids), torch.stack(noises), torch.stack(timesteps)


def micro_batch_loss(cfg: TrainConfig, trainee: Trainee, accelerator, noise_scheduler, prompts: PromptEncoder,
                     instance: LatentSource, prior: LatentSource | None, first: int):
    """The DreamBooth loss of samples first .. first + batch - 1 (and as many class images)."""
    bs, device, dtype = cfg.train_batch_size, accelerator.device, trainee.weight_dtype
    num_t = noise_scheduler.config.num_train_timesteps
    parts = [draw_samples(cfg, instance, "instance", first, num_t)]
    texts = [cfg.instance_prompt] * bs
    if prior is not None:
        parts.append(draw_samples(cfg, prior, "class", first, num_t))
        texts += [cfg.class_prompt] * bs
    latents, time_ids, noise, timesteps = (torch.cat(t) for t in zip(*parts))
    latents = latents.to(device, dtype)
    noise, timesteps = noise.to(latents), timesteps.to(device)
    embeds, pooled = zip(*(prompts.get(t) for t in texts))
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    cond = {}
    if pooled[0] is not None:  # SDXL: pooled text and micro-conditioning (original size, crop, target size)
        cond = {"added_cond_kwargs": {"text_embeds": torch.cat(pooled), "time_ids": time_ids.to(device, dtype)}}
    with accelerator.autocast():
        pred = trainee.pipe.unet(noisy, timesteps, torch.cat(embeds), **cond).sample
    mse = per_sample_mse(pred, target_of(noise_scheduler, latents, noise, timesteps))
    weights = None if cfg.snr_gamma is None else snr_weights(noise_scheduler, timesteps, cfg.snr_gamma)
    return dreambooth_loss(mse, bs, cfg.prior_loss_weight, weights)


def average_gradients(params, accelerator) -> None:
    """Adapters are small: one all-reduce of all their gradients, flattened (no DDP wrapper needed)."""
    flat = accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in params]), reduction="mean")
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


MAX_SKIPPED_IN_A_ROW = 30  # GradScaler halves its scale per skip: 2^16 -> below 1 long before this


def fit(cfg: TrainConfig, trainee: Trainee, inputs: Inputs, accelerator, log=print,
        resume: Path | None = None) -> FitResult:
    """Train to cfg.max_train_steps optimizer steps, from `resume` (a checkpoint folder) if given."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    pipe, unet = trainee.pipe, trainee.pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if cfg.prediction_type:
        noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
    rank, world = accelerator.process_index, accelerator.num_processes

    instance = LatentSource(pipe.vae, inputs.instance_images, cfg.resolution, cfg.center_crop, cfg.random_flip,
                            cfg.cache_latents)
    prior = (LatentSource(pipe.vae, inputs.class_images, cfg.resolution, cfg.center_crop, cfg.random_flip,
                          cfg.cache_latents) if cfg.with_prior_preservation else None)
    prompts = PromptEncoder(pipe, cache=cfg.cache_text_embeddings and not cfg.train_text_encoder)

    params = trainee.parameters()
    optimizer = accelerator.prepare_optimizer(make_optimizer(cfg, params))
    # The scheduler is stepped by hand once per optimizer step really taken, so its
    # step count depends neither on the number of processes nor on skipped fp16 steps.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=getattr(optimizer, "optimizer", optimizer),
                                 num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_train_steps,
                                 num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    if trainee.adapter == "singlora":
        attach_ramp(optimizer, *trainee.trained.values())  # after prepare: hooks the inner optimizer

    output_dir = Path(cfg.output_dir)
    write = lambda folder: write_weights(trainee, folder, cfg.pretrained_model_name_or_path, cfg)
    # optimizer steps taken; samples of the global stream consumed (by the last finished step)
    step, last_ckpt, samples = 0, None, 0
    if resume is not None:
        state = load_checkpoint(resume, lambda f: read_weights(trainee, f), optimizer, lr_scheduler,
                                accelerator.scaler)
        step, last_ckpt, samples = state["step"], resume, state["samples_seen"]
        log(f"resumed from {resume} at step {step} (saved by {state.get('num_processes', 1)} process(es))")
    at_step_end = samples
    bs = cfg.train_batch_size

    def checkpoint(at: int) -> Path | None:
        accelerator.wait_for_everyone()
        path = None
        if accelerator.is_main_process:
            path = save_checkpoint(output_dir, at, write, optimizer, lr_scheduler,
                                   {"samples_seen": at_step_end, "seed": cfg.seed, "num_processes": world,
                                    "max_train_steps": cfg.max_train_steps, "ramp_up_steps": trainee.ramp_up_steps,
                                    "adapter": cfg.adapter, "rank": cfg.rank},
                                   cfg.checkpoints_total_limit, accelerator.scaler)
        accelerator.wait_for_everyone()
        return path or output_dir / f"checkpoint-{at}"

    u_now = ramp_value(trainee)
    for m in trainee.trained.values():
        m.train()
    bar = tqdm(total=cfg.max_train_steps, initial=step, disable=not accelerator.is_local_main_process,
               desc="training", unit="step")
    validation_images: list[Path] = []
    started, skipped_in_a_row = time.perf_counter(), 0
    try:
        while step < cfg.max_train_steps:
            micro_logs = []
            for _ in range(cfg.gradient_accumulation_steps):
                with accelerator.accumulate(unet):
                    # This rank's slice of the global sample stream (see batches.sample_indices).
                    loss, logs = micro_batch_loss(cfg, trainee, accelerator, noise_scheduler, prompts, instance,
                                                  prior, samples + rank * bs)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"loss became {loss.item()} at step {step + 1}; training stopped. The last good "
                            f"checkpoint is {last_ckpt or 'none (no checkpoint written yet)'}. Lower "
                            f"--learning_rate or use --mixed_precision bf16/no, then resume from it.")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if world > 1:
                            average_gradients(params, accelerator)
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients and not optimizer.step_was_skipped:
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                samples += world * bs
                micro_logs.append(logs)
            at_step_end = samples  # what checkpoints record: a Ctrl-C mid-step redoes that step
            if optimizer.step_was_skipped:
                # fp16: GradScaler found inf/NaN gradients and skipped the update. Nothing
                # advanced (weights, u(t), LR schedule, step count); the data moved on.
                skipped_in_a_row += 1
                if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise TrainingDiverged(
                        f"{skipped_in_a_row} optimizer steps in a row had inf/NaN gradients (fp16 overflow) at "
                        f"step {step + 1}; training stopped. The last good checkpoint is "
                        f"{last_ckpt or 'none'}. Use --mixed_precision bf16/no or a lower --learning_rate.")
                continue
            skipped_in_a_row = 0
            step += 1
            # the mean over the micro-batches of this step, not the last one's
            logs = {k: sum(m[k] for m in micro_logs) / len(micro_logs) for k in micro_logs[0]}
            logs.update(lr=lr_scheduler.get_last_lr()[0], u=u_now())
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
            accelerator.log(logs, step=step)
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
                last_ckpt = checkpoint(step)
            if cfg.validation_prompt and step % cfg.validation_steps == 0:
                validation_images = validate_images(cfg, trainee, accelerator, step)
            if accelerator.is_main_process:
                write_progress(output_dir, step=step, total=cfg.max_train_steps, loss=logs.get("loss"),
                               validation_image=str(validation_images[0]) if validation_images else None)
    except Exception:
        bar.close()  # the error message gets a line of its own, not the end of the bar's
        raise
    except KeyboardInterrupt:
        bar.close()
        last_ckpt = checkpoint(step) if step > 0 else last_ckpt
        log(f"\ninterrupted at step {step}; checkpoint: {last_ckpt}. Resume with the same command plus "
            f"--resume_from_checkpoint latest")
        return FitResult(step, last_ckpt, interrupted=True, validation_images=validation_images)
    bar.close()
    log(f"trained {step} steps in {time.perf_counter() - started:.0f} s")
    return FitResult(step, last_ckpt, validation_images=validation_images)


@torch.no_grad()
def validate_images(cfg: TrainConfig, trainee: Trainee, accelerator, step: int) -> list[Path]:
    """Render the validation prompt with the model being trained, in place.

    Nothing is cast or copied: the trained modules keep their dtypes (the bug
    where diffusers' scripts cast LoRA layers to fp16 for validation and then
    fail to train on).
    """
    from ..generate import render

    if not accelerator.is_main_process:
        return []
    models = list(trainee.trained.values())
    for m in models:
        m.eval()
    images = render(trainee.pipe, cfg.validation_prompt, seed=cfg.seed, steps=cfg.validation_inference_steps,
                    num_images=cfg.num_validation_images, width=cfg.resolution, height=cfg.resolution)
    for m in models:
        m.train()
    folder = Path(cfg.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"step-{step:06d}-{i}.png")
        image.save(paths[-1])
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step,
                                      dataformats="NHWC")
    return paths

