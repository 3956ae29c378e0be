"""Phase 3: the training loop, checkpoints, validation, Ctrl-C and NaN handling.

    fit: TrainingLoop(...) sets up the optimizer and EMA (optim.py), LR schedule and data -> resume?
         -> until max_train_steps:  optimizer_step  gradient_accumulation_steps micro-batches, one update
                                                    (and one EMA update with --use_ema)
                                    after_step      log the step's mean loss; checkpoint, validation
                                                    images, progress file when due
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..files import write_progress
from ..inject import attach_ramp, singlora_modules
from ..layer import ramp
from .batches import PromptEncoder, TrainingData
from .build import Inputs, Trainee
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .dataset import validation_prompts
from .loss import dreambooth_loss
from .objective import FORWARD, make_objective
from .optim import AdapterEMA, make_optimizer, param_groups
from .weights import read_weights, write_weights


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN/Inf: the user lowers the learning rate or resumes from an earlier checkpoint."""


@dataclass
class FitResult:
    step: int
    last_checkpoint: Path | None
    interrupted: bool = False
    validation_images: list[Path] | None = None


def ramp_value(trainee: Trainee):
    """A function giving the current u(t) (1.0 for LoRA/DoRA); the module is looked up once."""
    if trainee.adapter != "singlora":
        return lambda: 1.0
    m = next(iter(singlora_modules(trainee.denoiser).values()))
    return lambda: float(ramp(m.singlora_step, m.ramp_up_steps))


def micro_batch_loss(cfg: TrainConfig, trainee: Trainee, accelerator, objective, prompts: PromptEncoder,
                     data: TrainingData, k: int):
    """The DreamBooth loss of batch k of the global stream (instance samples, and as many class samples)."""
    device, dtype = accelerator.device, trainee.weight_dtype
    batch = data.micro_batch(k, objective.draw_timestep)
    latents = batch.latents.to(device, dtype)
    noise, timesteps = batch.noise.to(latents), batch.timesteps.to(device)
    cond = prompts.batch(batch.prompts)
    if "text_embeds" in cond:  # SDXL's micro-conditioning (original size, crop, target size)
        cond["time_ids"] = batch.time_ids.to(device, dtype)
    noisy = objective.noisy(latents, noise, timesteps)
    with accelerator.autocast():
        pred = FORWARD[trainee.family.arch](trainee.pipe, noisy, objective.model_timesteps(timesteps), cond, cfg)
    mse, weights = objective.errors(pred, latents, noise, timesteps)
    return dreambooth_loss(mse, batch.n_instance, cfg.prior_loss_weight, weights)


def average_gradients(params, accelerator) -> None:
    """Adapters are small: one all-reduce of all their gradients, flattened (no DDP wrapper needed)."""
    flat = accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in params]), reduction="mean")
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


MAX_SKIPPED_IN_A_ROW = 30  # GradScaler halves its scale per skip: 2^16 -> below 1 long before this


def mean_logs(micro_logs: list[dict]) -> dict:
    """An optimizer step's logs: each value's mean over the step's micro-batches (not the last one's)."""
    return {k: sum(m[k] for m in micro_logs) / len(micro_logs) for k in micro_logs[0]}


class TrainingLoop:
    """One fit in progress: what trains (optimizer, LR schedule, data sources) and where it stands."""

    def __init__(self, cfg: TrainConfig, trainee: Trainee, inputs: Inputs, accelerator):
        from diffusers.optimization import get_scheduler

        self.cfg, self.trainee, self.accelerator = cfg, trainee, accelerator
        pipe = trainee.pipe
        self.objective = make_objective(cfg, pipe, trainee.family)
        self.data = TrainingData(cfg, pipe.vae, inputs.concepts, inputs.items, inputs.class_images,
                                 cfg.with_prior_preservation)
        self.prompts = trainee.prompts
        self.params = trainee.parameters()
        self.optimizer = accelerator.prepare_optimizer(make_optimizer(cfg, param_groups(cfg, trainee)))
        self.ema = AdapterEMA(self.params, cfg.ema_decay) if cfg.use_ema else None
        # The scheduler is stepped by hand once per optimizer step really taken, so its
        # step count depends neither on the number of processes nor on skipped fp16 steps.
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=getattr(self.optimizer, "optimizer",
                                                                              self.optimizer),
                                          num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_train_steps,
                                          num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
        if trainee.adapter == "singlora":
            attach_ramp(self.optimizer, *trainee.trained.values())  # after prepare: hooks the inner optimizer
        self.u_now = ramp_value(trainee)
        self.validation_prompts = validation_prompts(cfg, inputs.concepts)
        self.step = 0                 # optimizer steps taken
        self.samples = 0              # samples of the global stream consumed
        self.at_step_end = 0          # ... by the last finished step: a Ctrl-C mid-step redoes that step
        self.last_checkpoint: Path | None = None
        self.skipped_in_a_row = 0     # fp16 steps GradScaler skipped since the last one taken
        self.validation_images: list[Path] = []

    def resume(self, path: Path, log) -> None:
        state = load_checkpoint(path, lambda folder: read_weights(self.trainee, folder), self.optimizer,
                                self.lr_scheduler, self.accelerator.scaler, self.ema)
        self.step, self.samples = state["step"], state["samples_seen"]
        self.at_step_end, self.last_checkpoint = self.samples, path
        log(f"resumed from {path} at step {self.step} (saved by {state.get('num_processes', 1)} process(es))")

    def optimizer_step(self) -> dict | None:
        """gradient_accumulation_steps micro-batches, one update: the step's mean logs, or None when fp16
        skipped the update."""
        cfg, accelerator = self.cfg, self.accelerator
        micro_logs = []
        for _ in range(cfg.gradient_accumulation_steps):
            with accelerator.accumulate(self.trainee.denoiser):
                # This rank's batch of the global stream (see batches.BatchPlan).
                k = self.samples // cfg.train_batch_size + accelerator.process_index
                loss, logs = micro_batch_loss(cfg, self.trainee, accelerator, self.objective, self.prompts,
                                              self.data, k)
                if not torch.isfinite(loss):  # before backward: a NaN never reaches the weights
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at step {self.step + 1}; training stopped. The last good "
                        f"checkpoint is {self.last_checkpoint or 'none (no checkpoint written yet)'}. Lower "
                        f"--learning_rate or use --mixed_precision bf16/no, then resume from it.")
                self.backward_and_update(loss)
            self.samples += accelerator.num_processes * cfg.train_batch_size
            micro_logs.append(logs)
        self.at_step_end = self.samples
        if self.optimizer.step_was_skipped:
            self.note_skipped_step()
            return None
        self.skipped_in_a_row = 0
        if self.ema is not None:  # after the update really taken, so it averages the weights of steps 1..t
            self.ema.update()
        return mean_logs(micro_logs)

    def backward_and_update(self, loss: torch.Tensor) -> None:
        """Backward; the last micro-batch of a step also averages, clips and updates (on the others
        accelerate's optimizer step and zero_grad do nothing, so gradients accumulate)."""
        accelerator, optimizer = self.accelerator, self.optimizer
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            if accelerator.num_processes > 1:
                average_gradients(self.params, accelerator)
            accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        optimizer.step()
        if accelerator.sync_gradients and not optimizer.step_was_skipped:
            self.lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def note_skipped_step(self) -> None:
        # fp16: GradScaler found inf/NaN gradients and skipped the update. Nothing
        # advanced (weights, u(t), LR schedule, step count); the data moved on.
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise TrainingDiverged(
                f"{self.skipped_in_a_row} optimizer steps in a row had inf/NaN gradients (fp16 overflow) at "
                f"step {self.step + 1}; training stopped. The last good checkpoint is "
                f"{self.last_checkpoint or 'none'}. Use --mixed_precision bf16/no or a lower --learning_rate.")

    def after_step(self, logs: dict, bar) -> None:
        """A step taken: count and log it; the checkpoint, validation images and progress file when due."""
        cfg, accelerator = self.cfg, self.accelerator
        self.step += 1
        logs = dict(logs, lr=self.lr_scheduler.get_last_lr()[0], u=self.u_now())
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
        accelerator.log(logs, step=self.step)
        if self.step % cfg.checkpointing_steps == 0 or self.step == cfg.max_train_steps:
            self.last_checkpoint = self.checkpoint()
        if self.validation_prompts and self.step % cfg.validation_steps == 0:
            with self.ema.weights_in_use() if self.ema is not None else nullcontext():
                self.validation_images = validate_images(cfg, self.trainee, accelerator, self.step,
                                                         self.validation_prompts)
        if accelerator.is_main_process:
            write_progress(cfg.output_dir, step=self.step, total=cfg.max_train_steps, loss=logs.get("loss"),
                           validation_image=str(self.validation_images[0]) if self.validation_images else None)

    def checkpoint(self) -> Path:
        """checkpoint-{step}/, written by the main process while the others wait."""
        cfg, accelerator = self.cfg, self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"samples_seen": self.at_step_end, "seed": cfg.seed, "num_processes": accelerator.num_processes,
                     "max_train_steps": cfg.max_train_steps, "ramp_up_steps": self.trainee.ramp_up_steps,
                     "adapter": cfg.adapter, "rank": cfg.rank, "use_ema": cfg.use_ema,
                     **({"ema_decay": cfg.ema_decay} if cfg.use_ema else {})}
            save_checkpoint(cfg.output_dir, self.step, self.write_weights, self.optimizer, self.lr_scheduler, state,
                            cfg.checkpoints_total_limit, accelerator.scaler, self.ema)
        accelerator.wait_for_everyone()
        return Path(cfg.output_dir) / f"checkpoint-{self.step}"

    def write_weights(self, folder: Path) -> Path:
        return write_weights(self.trainee, folder, self.cfg.pretrained_model_name_or_path, self.cfg)

    def result(self, interrupted: bool = False) -> FitResult:
        return FitResult(self.step, self.last_checkpoint, interrupted, self.validation_images)


def fit(cfg: TrainConfig, trainee: Trainee, inputs: Inputs, accelerator, log=print,
        resume: Path | None = None) -> FitResult:
    """Train to cfg.max_train_steps optimizer steps, from `resume` (a checkpoint folder) if given."""
    from tqdm.auto import tqdm

    loop = TrainingLoop(cfg, trainee, inputs, accelerator)
    if resume is not None:
        loop.resume(resume, log)
    for m in trainee.trained.values():
        m.train()
    bar = tqdm(total=cfg.max_train_steps, initial=loop.step, disable=not accelerator.is_local_main_process,
               desc="training", unit="step")
    started = time.perf_counter()
    try:
        while loop.step < cfg.max_train_steps:
            logs = loop.optimizer_step()
            if logs is not None:  # None: fp16 skipped the update, the step is redone on the next data
                loop.after_step(logs, bar)
    except KeyboardInterrupt:
        bar.close()  # the message gets a line of its own, not the end of the bar's
        if loop.step > 0:
            loop.last_checkpoint = loop.checkpoint()
        log(f"\ninterrupted at step {loop.step}; checkpoint: {loop.last_checkpoint}. Resume with the same command "
            f"plus --resume_from_checkpoint latest")
        return loop.result(interrupted=True)
    finally:
        bar.close()  # also before an error's message
    log(f"trained {loop.step} steps in {time.perf_counter() - started:.0f} s")
    if loop.ema is not None:  # the model returned, and so the final files and the card's samples, are the EMA's
        loop.ema.copy_to_model()
    return loop.result()


@torch.no_grad()
def validate_images(cfg: TrainConfig, trainee: Trainee, accelerator, step: int, prompts: list[str]) -> list[Path]:
    """Render the validation prompts with the model being trained, in place: step-N-K.png, K counting
    the images of every prompt in order.

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
    images = [image for prompt in prompts
              for image in render(trainee.pipe, prompt, embeds=trainee.prompts.for_render(prompt), seed=cfg.seed,
                                  steps=cfg.validation_inference_steps,
                                  num_images=cfg.num_validation_images, width=cfg.resolution, height=cfg.resolution)]
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

