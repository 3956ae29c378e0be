"""A training run in a background process: the trainer's arguments for a Train-tab request,
start, poll its progress, cancel cleanly.

The one module of the web UI that knows the trainer: it reads the presets through the
trainer's public surface (singlora_diffusion.training) and runs the installed trainer
in a process of its own.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..files import read_progress
from ..training.config import PRODIGY_LR  # the trainer's learning rate for prodigy
from .requests import CAPTION_SUFFIX, BadRequest, TrainRequest

# Train-tab choice -> shipped preset (singlora_diffusion/configs/, package data)
PRESETS = {"demo": "demo", "sd15": "sd15", "sdxl": "sdxl", "paper": "paper_sd15"}


def _field(name: str):
    import dataclasses

    from ..training import TrainConfig

    return next(f for f in dataclasses.fields(TrainConfig) if f.name == name)


def trainer_default(name: str):
    """TrainConfig's default of one field: the Train tab shows the trainer's own values."""
    return _field(name).default


def optimizers() -> tuple[str, ...]:
    """The trainer's --optimizer choices, as its config declares them."""
    return tuple(_field("optimizer").metadata["choices"])


def optimizer_problems() -> dict[str, str]:
    """{optimizer: why it cannot run here} for the trainer's optimizers this machine lacks."""
    import torch

    from ..training.optim import PACKAGES, missing_package

    problems = {name: f"{name} needs {PACKAGES[name][0]}: {missing_package(name)}" for name in optimizers()
                if missing_package(name)}
    if not torch.cuda.is_available():  # the trainer would run it; bitsandbytes' 8-bit states want a GPU
        problems["adamw8bit"] = "adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit states); none is available here"
    return {name: problems[name] for name in optimizers() if name in problems}


def offered_optimizers() -> list[str]:
    problems = optimizer_problems()
    return [name for name in optimizers() if name not in problems]


def class_args(preset: str, class_name: str | None, adapters_dir: Path) -> list[str]:
    """The Train tab's class for every preset: its prompt and its own class-image folder.

    Presets with prior preservation name a class folder of their own (dog images for
    sd15): a cat subject must not train against them, so the folder follows the class.
    Class images are generated once per class and reused by later runs.
    """
    from ..training import load_yaml

    name = (class_name or "").strip()
    if not name:
        if load_yaml(PRESETS[preset]).get("with_prior_preservation"):
            raise BadRequest(f"The {preset} preset uses prior preservation: give the subject's class, e.g. 'dog'.")
        return []
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "class"
    return ["--class_prompt", f"a photo of {name}", "--class_data_dir", str(adapters_dir / "class_images" / slug)]


def trainer_args(req: TrainRequest, data: Path, captions: bool, extra: list[str]) -> list[str]:
    """The trainer's command line for a checked Train-tab request (TrainingJob adds --output_dir).

    Settings left blank are left out: the preset's YAML (or the trainer's default) fills them.
    """
    # --flag=value for the typed prompt: a prompt that starts with "-" must not read as a flag
    args = ["--config", PRESETS[req.preset], "--instance_data_dir", str(data),
            f"--instance_prompt={req.instance_prompt}", "--max_train_steps", str(req.steps), "--adapter", req.adapter,
            "--optimizer", req.optimizer]
    lr = req.learning_rate
    if lr is None and req.optimizer == "prodigy":
        lr = PRODIGY_LR  # the preset's learning rate is AdamW's (1e-3): as Prodigy's multiplier it would stall it
    given = {"learning_rate": lr, "caption_dropout_rate": req.caption_dropout_rate or None}
    if req.adapter == "loraplus":
        given["loraplus_lr_ratio"] = req.loraplus_lr_ratio
    if req.enable_bucket:
        args.append("--enable_bucket")
        given.update(min_bucket_reso=req.min_bucket_reso, max_bucket_reso=req.max_bucket_reso,
                     bucket_reso_steps=req.bucket_reso_steps)
        if req.min_bucket_reso is None:
            given["min_bucket_reso"] = _small_preset_min_bucket(req)
    if req.use_ema:
        args.append("--use_ema")
        given["ema_decay"] = req.ema_decay
    if captions:
        args += ["--caption_extension", CAPTION_SUFFIX]
    for name, value in given.items():
        if value is not None:
            args += [f"--{name}", repr(value) if isinstance(value, float) else str(value)]  # repr: no digits lost
    return [*args, *extra]


def _small_preset_min_bucket(req: TrainRequest) -> int | None:
    """The preset's resolution when the trainer's smallest bucket cannot hold it (the demo trains at 64 px)."""
    from ..training import load_yaml

    resolution = load_yaml(PRESETS[req.preset]).get("resolution", trainer_default("resolution"))
    return resolution if resolution < trainer_default("min_bucket_reso") else None


def check_args(args: list[str]):
    """The TrainConfig the trainer will build from `args`: its checks run here, before a run folder exists."""
    from ..training import parse_config

    return parse_config(args)


@dataclass
class Status:
    state: str            # idle | running | finished | cancelled | failed
    step: int = 0
    total: int = 0
    loss: float | None = None
    validation_image: str | None = None
    message: str = ""


def thread_share(cores: int) -> tuple[int, int]:
    """CPU threads for (the server, a training run) while both work.

    Each torch process otherwise starts one thread per core, and two processes
    that each use every core slow each other far more than 2x.
    """
    trainer = max(1, cores // 2)
    return max(1, cores - trainer), trainer


def threads_env(threads: int | None) -> dict[str, str]:
    if threads is None:
        return {}
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}  # torch reads them at start


class TrainingJob:
    def __init__(self, output_dir: Path, args: list[str], threads: int | None = None):
        self.output_dir = Path(output_dir)
        self.args = args  # the trainer's command line, less --output_dir
        self.log = self.output_dir / "webui-train.log"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # The installed package's trainer, not a checkout's script: the UI runs from a wheel too.
        cmd = [sys.executable, "-m", "singlora_diffusion.training", *args, "--output_dir", str(self.output_dir)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.output_dir,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **threads_env(threads)})
        self.cancelled = False

    def cancel(self) -> None:
        """SIGINT: the trainer saves a checkpoint and exits (the same as Ctrl-C)."""
        if self.proc.poll() is None:
            self.cancelled = True
            self.proc.send_signal(signal.SIGINT)

    def status(self) -> Status:
        progress = read_progress(self.output_dir)  # {} before the first step
        code = self.proc.poll()
        state = "running" if code is None else "cancelled" if self.cancelled else "finished" if code == 0 else "failed"
        message = ""
        if state == "failed":
            lines = self.log.read_text(errors="replace").strip().splitlines()
            message = lines[-1] if lines else f"exit code {code}"
        return Status(state, progress.get("step", 0), progress.get("total", 0), progress.get("loss"),
                      progress.get("validation_image"), message)
