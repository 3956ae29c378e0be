"""A training run in a background process: start, poll its progress, cancel cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..training.loop import PROGRESS_FILE

# Train-tab choice -> shipped preset (singlora_diffusion/configs/, package data)
PRESETS = {"demo": "demo", "sd15": "sd15", "sdxl": "sdxl", "paper": "paper_sd15"}


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
        progress = {}
        path = self.output_dir / PROGRESS_FILE
        if path.is_file():
            try:
                progress = json.loads(path.read_text())
            except ValueError:
                progress = {}  # being rewritten right now: next poll
        code = self.proc.poll()
        state = "running" if code is None else "cancelled" if self.cancelled else "finished" if code == 0 else "failed"
        message = ""
        if state == "failed":
            lines = self.log.read_text(errors="replace").strip().splitlines()
            message = lines[-1] if lines else f"exit code {code}"
        return Status(state, progress.get("step", 0), progress.get("total", 0), progress.get("loss"),
                      progress.get("validation_image"), message)
