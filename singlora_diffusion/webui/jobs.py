"""A training run in a background process: the trainer's arguments for a Train-tab request,
start, poll its progress, cancel cleanly.

The one module of the web UI that knows the trainer: it reads the presets through the
trainer's public surface (singlora_diffusion.training) and runs the installed trainer
in a process of its own.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..bundled import BUNDLED_PREFIX
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
    name = (class_name or "").strip()
    if not name:
        if preset_setting(preset, "with_prior_preservation"):
            raise BadRequest(f"The {preset} preset uses prior preservation: give the subject's class, e.g. 'dog'.")
        return []
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "class"
    return ["--class_prompt", f"a photo of {name}", "--class_data_dir", str(adapters_dir / "class_images" / slug)]


def preset_setting(preset: str, name: str):
    """A shipped preset's value of one setting, else the trainer's default."""
    from ..training import load_yaml

    return load_yaml(PRESETS[preset]).get(name, trainer_default(name))


def preset_subject(preset: str) -> str | None:
    """The preset's own subject when it ships one (bundled:NAME; the demo's is bundled:toy_subject).

    A run given no photos trains on it, as the trainer does when no --instance_data_dir flag
    overrides the YAML's (defaults < YAML < flags). Other presets name a placeholder
    (path/to/your/photos): None, the user must give photos.
    """
    value = preset_setting(preset, "instance_data_dir")
    return value if isinstance(value, str) and value.startswith(BUNDLED_PREFIX) else None


BUCKET_FIELDS = ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")


def small_preset_buckets(resolution: int, step: int | None = None) -> dict[str, int]:
    """Bucket settings for a preset whose resolution is under the trainer's smallest bucket side.

    The trainer's defaults (256 .. 1024 in steps of 64) are kohya's for 512 px and cannot hold
    the demo's 32 px. Scaled by resolution / 512, the step rounded up to a multiple of 8 (the
    VAE's factor), the range's ends to multiples of the step around the resolution: 16 .. 64 in
    steps of 8 at 32 px, so a photo that is not square still gets a bucket of its own shape.
    `step`: the user's, when given (the ends are then its multiples). {} for any other preset:
    the trainer's defaults stand.
    """
    low, high, default_step = (trainer_default(name) for name in BUCKET_FIELDS)
    if resolution >= low:
        return {}
    scale = resolution / trainer_default("resolution")
    step = step or max(8, math.ceil(default_step * scale / 8) * 8)
    return {"min_bucket_reso": max(step, math.floor(low * scale / step) * step),
            "max_bucket_reso": max(resolution, math.ceil(high * scale / step) * step), "bucket_reso_steps": step}


def bucket_default(name: str) -> str:
    """What a bucket field left at 0 means, for the Train tab's label: "256; demo: 16"."""
    scaled = {preset: small_preset_buckets(preset_setting(preset, "resolution")) for preset in PRESETS}
    return "; ".join([str(trainer_default(name))] + [f"{preset}: {b[name]}" for preset, b in scaled.items() if b])


def trainer_args(req: TrainRequest, data: Path | str, captions: bool, extra: list[str]) -> list[str]:
    """The trainer's command line for a checked Train-tab request (TrainingJob adds --output_dir).

    `data`: the photos' folder, or the preset's own subject (bundled:NAME). Settings left blank
    are left out: the preset's YAML (or the trainer's default) fills them.
    """
    args = ["--config", PRESETS[req.preset], "--instance_data_dir", str(data), "--max_train_steps", str(req.steps),
            "--adapter", req.adapter, "--optimizer", req.optimizer]
    if req.instance_prompt:  # --flag=value: a prompt that starts with "-" must not read as a flag
        args.append(f"--instance_prompt={req.instance_prompt}")
    lr = req.learning_rate
    if lr is None and req.optimizer == "prodigy":
        lr = PRODIGY_LR  # the preset's learning rate is AdamW's (1e-3): as Prodigy's multiplier it would stall it
    given = {"learning_rate": lr, "caption_dropout_rate": req.caption_dropout_rate or None}
    if req.adapter == "loraplus":
        given["loraplus_lr_ratio"] = req.loraplus_lr_ratio
    if req.enable_bucket:
        args.append("--enable_bucket")
        small = small_preset_buckets(preset_setting(req.preset, "resolution"), req.bucket_reso_steps)
        given.update({name: getattr(req, name) or small.get(name) for name in BUCKET_FIELDS})
    if req.use_ema:
        args.append("--use_ema")
        given["ema_decay"] = req.ema_decay
    if captions:
        args += ["--caption_extension", CAPTION_SUFFIX]
    for name, value in given.items():
        if value is not None:
            args += [f"--{name}", repr(value) if isinstance(value, float) else str(value)]  # repr: no digits lost
    return [*args, *extra]


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
