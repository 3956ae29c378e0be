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
from .requests import BadRequest

# Train-tab choice -> shipped preset (singlora_diffusion/configs/, package data)
PRESETS = {"demo": "demo", "sd15": "sd15", "sdxl": "sdxl", "paper": "paper_sd15"}


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


def trainer_args(preset: str, data: Path, instance_prompt: str, steps: int, extra: list[str]) -> list[str]:
    """The trainer's command line for a checked Train-tab request (TrainingJob adds --output_dir)."""
    return ["--config", PRESETS[preset], "--instance_data_dir", str(data), "--instance_prompt", instance_prompt,
            "--max_train_steps", str(steps), *extra]


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
