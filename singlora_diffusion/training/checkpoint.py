"""checkpoint-N/ folders: written atomically, pruned after, found again by `latest`.

A checkpoint holds the adapter weights (safetensors; for SingLoRA the native
file, which carries the ramp step), the optimizer and LR-scheduler states, the
fp16 GradScaler's state (scaler.pt, fp16 runs only), the RNG states and
trainer_state.json (optimizer steps done, samples consumed = the data
position, seed, process count, max_train_steps, ramp_up_steps). The .pt
states are torch.save'd tensors and numbers, read back with weights_only=True
(no code is ever unpickled).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import torch

STATE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder without trainer_state.json is not one)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, spec: str | None) -> Path | None:
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            print(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}, starting from scratch")
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: not a complete checkpoint folder "
                                f"(no {STATE}); pass a checkpoint-N folder or 'latest'")
    return path


KILL_AFTER_ENV = "SINGLORA_KILL_AFTER_CHECKPOINT"  # crash tests: SIGKILL right after checkpoint-N is complete


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE).read_text())


def reconcile_resume(cfg, path: Path) -> str | None:
    """Settle the run's ramp length against checkpoint `path`; one line saying what changes, or None.

    A ramp length the user did not give is taken from the checkpoint: the default
    (1 % of max_train_steps) would otherwise move with a new --max_train_steps and
    drop u(t) below 1 in the middle of training.
    """
    state = read_state(path)
    saved_steps, saved_T = state.get("max_train_steps"), state.get("ramp_up_steps")
    if saved_T is None and cfg.adapter == "singlora":  # checkpoints written before trainer_state had it
        from ..format import WEIGHTS_NAME, read_metadata

        saved_T = int(read_metadata(path / WEIGHTS_NAME)["ramp_up_steps"])
    changes = []
    if saved_steps is not None and saved_steps != cfg.max_train_steps:
        changes.append(f"max_train_steps {saved_steps} -> {cfg.max_train_steps} (the LR schedule now spans "
                       f"{cfg.max_train_steps} steps)")
    if cfg.adapter == "singlora" and saved_T is not None:
        if cfg.ramp_up_steps is None:
            cfg.ramp_up_steps = saved_T
            if changes:
                changes.append(f"ramp_up_steps kept at {saved_T} from the checkpoint")
        elif cfg.ramp_up_steps != saved_T:
            from ..layer import ramp

            step = state["step"]
            changes.append(f"ramp_up_steps {saved_T} -> {cfg.ramp_up_steps} (u at step {step}: "
                           f"{float(ramp(step, saved_T)):.2f} -> {float(ramp(step, cfg.ramp_up_steps)):.2f})")
    return f"resuming {path.name} with other settings: " + "; ".join(changes) if changes else None


def save_checkpoint(output_dir: str | Path, step: int, write_weights, optimizer, lr_scheduler, state: dict,
                    total_limit: int | None, scaler=None) -> Path:
    """Write checkpoint-{step}/ via a temporary folder and a rename, then prune the oldest."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(tmp)
    torch.save(getattr(optimizer, "optimizer", optimizer).state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:  # its loss scale and growth tracker: an fp16 resume equals a straight fp16 run
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    version, internal, gauss = random.getstate()
    torch.save({"torch": torch.get_rng_state(), "python": torch.tensor(internal, dtype=torch.int64),
                **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}, tmp / "rng_state.pt")
    (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2))  # written last: marks it complete
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    # Prune only now that the new checkpoint is complete.
    if total_limit is not None:
        for old in list_checkpoints(out)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    if os.environ.get(KILL_AFTER_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)  # a crash at a known point, for the kill -9 resume test
    return final


def load_checkpoint(path: Path, load_weights, optimizer, lr_scheduler, scaler=None) -> dict:
    load_weights(path)
    getattr(optimizer, "optimizer", optimizer).load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng = torch.load(path / "rng_state.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(int(v) for v in rng["python"]), None))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return read_state(path)
