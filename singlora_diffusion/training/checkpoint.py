"""checkpoint-N/ folders: written atomically, pruned after, found again by `latest`.

A checkpoint holds the adapter weights (safetensors; for SingLoRA the native
file, which carries the ramp step), the optimizer and LR-scheduler states, the
fp16 GradScaler's state (scaler.pt, fp16 runs only), the EMA of the adapter
weights (ema.pt, --use_ema runs only: diffusers' EMAModel.state_dict(); the
safetensors hold the live weights, so training resumes from them), the RNG states and
trainer_state.json (optimizer steps done, samples consumed = the data
position, seed, process count, max_train_steps, ramp_up_steps). The .pt
states are torch.save'd tensors and numbers, read back with weights_only=True
(no code is ever unpickled).

Why not accelerate's save_state/load_state: their RNG file is a pickle of Python and
numpy objects (ours holds tensors and numbers only), they check no file before a resume
starts (check_checkpoint reads every one), and they do not record the data position in
samples, which is what lets a checkpoint resume under another process count.
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

from ..errors import BadInput, WriteError
from ..files import atomic_path

STATE = "trainer_state.json"
EMA_NAME = "ema.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder without trainer_state.json is not one)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


class CheckpointError(BadInput):
    """A checkpoint that cannot be resumed from; the message names the file and says what to do."""


class SettingsMismatch(CheckpointError):
    """A whole checkpoint written with settings this run cannot continue (another rank or adapter)."""


# file -> keys its (torch.load'ed) dict must have
_PARTS = {"optimizer.pt": ("state", "param_groups"), "scheduler.pt": ("last_epoch",),
          "rng_state.pt": ("torch", "python")}


def check_checkpoint(path: Path, cfg=None) -> dict:
    """trainer_state of checkpoint `path` after reading every file in it; CheckpointError names what is wrong.

    Reads the whole folder (small: the adapter and its optimizer state), so a
    truncated file is found here, before any model loads, not halfway through a
    resume. With `cfg`, also the settings that must not change (adapter, rank).
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        state = read_state(path)
        for key in ("step", "samples_seen"):
            if not isinstance(state.get(key), int):
                raise BadInput(f"{STATE} has no whole-number {key!r}")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: {STATE} is unreadable ({e})") from None
    for name, keys in _PARTS.items():
        try:
            part = torch.load(path / name, weights_only=True)
            missing = [k for k in keys if k not in part]
            if missing:
                raise BadInput(f"it lacks {missing[0]!r}")
        except Exception as e:  # torch raises several types for truncated or foreign files
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path / name} is damaged ({why})") from None
    if (path / "scaler.pt").exists():  # fp16 runs
        try:
            torch.load(path / "scaler.pt", weights_only=True)["scale"]
        except Exception as e:
            raise CheckpointError(f"{path / 'scaler.pt'} is damaged ({type(e).__name__}: {e})") from None
    check_ema(path, state, cfg)
    weights = list(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{path} holds no adapter weights (*.safetensors)")
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
                metadata = f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"{file} is damaged ({e})") from None
        if cfg is not None:
            saved = {"adapter": state.get("adapter"), "rank": state.get("rank") or
                     (int(metadata["rank"]) if "rank" in metadata else None)}
            for key, value in saved.items():
                if value is not None and value != getattr(cfg, key):
                    raise SettingsMismatch(f"{path} was written with --{key} {value}, this run has --{key} "
                                          f"{getattr(cfg, key)}: resume with --{key} {value}, or train into a new "
                                          f"--output_dir")
    return state


def check_ema(path: Path, state: dict, cfg=None) -> None:
    """ema.pt reads back and holds one update per optimizer step; a --use_ema resume needs it."""
    file = path / EMA_NAME
    if not file.exists():
        if cfg is not None and getattr(cfg, "use_ema", False):
            raise SettingsMismatch(f"{path} was written without --use_ema (no {EMA_NAME}): its EMA cannot be "
                                   f"continued; resume without --use_ema, or train into a new --output_dir")
        return
    try:
        ema = torch.load(file, weights_only=True)
        updates, shadow = ema["optimization_step"], ema["shadow_params"]
        if not isinstance(shadow, list) or not all(isinstance(t, torch.Tensor) for t in shadow):
            raise BadInput("its shadow_params are not a list of tensors")
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file} is damaged ({why})") from None
    if updates != state["step"]:
        raise CheckpointError(f"{file} holds {updates} EMA updates but {STATE} says step {state['step']}: the "
                              f"files are from different runs; resume from another checkpoint")


def resolve_resume(output_dir: str | Path, spec: str | None, cfg=None, log=print) -> Path | None:
    """The checkpoint to resume from: `latest` is the newest one that reads back whole.

    A damaged checkpoint (a truncated file, a crash between files) is skipped
    with one line saying why; a checkpoint named explicitly must be whole. When
    checkpoints exist but none is whole, the run stops rather than start over
    (a fresh run would replace them).
    """
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        for path in reversed(found):
            try:
                check_checkpoint(path, cfg)
                return path
            except SettingsMismatch:
                raise  # an older checkpoint has the same settings: nothing to fall back to
            except CheckpointError as e:
                log(f"--resume_from_checkpoint latest: skipping {path.name}: {e}")
        if found:
            raise CheckpointError(f"--resume_from_checkpoint latest: none of the {len(found)} checkpoints in "
                                  f"{output_dir} reads back whole (see above); move them away to start over, "
                                  f"or train into a new --output_dir")
        log(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}, starting from scratch")
        return None
    path = Path(spec)
    if not (path / STATE).is_file():
        raise CheckpointError(f"--resume_from_checkpoint {spec}: not a complete checkpoint folder "
                              f"(no {STATE}); pass a checkpoint-N folder or 'latest'")
    try:
        check_checkpoint(path, cfg)
    except CheckpointError as e:
        raise CheckpointError(f"--resume_from_checkpoint {spec}: {e}; pass an earlier checkpoint-N or 'latest'") from None
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
    if state.get("use_ema") and not cfg.use_ema:
        changes.append("--use_ema dropped: the final adapter will be the live weights, not their average")
    elif cfg.use_ema and state.get("ema_decay") not in (None, cfg.ema_decay):
        changes.append(f"ema_decay {state['ema_decay']} -> {cfg.ema_decay}")
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
                    total_limit: int | None, scaler=None, ema=None) -> Path:
    """Write checkpoint-{step}/ via a temporary folder and a rename, then prune the oldest."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    try:
        # A folder of the same step (a resume that redoes it) is replaced only once the new one is whole.
        with atomic_path(final, replace_folder=True) as tmp:
            tmp.mkdir(parents=True)
            write_weights(tmp)
            torch.save(getattr(optimizer, "optimizer", optimizer).state_dict(), tmp / "optimizer.pt")
            torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
            if scaler is not None:  # its loss scale and growth tracker: an fp16 resume equals a straight fp16 run
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            if ema is not None:  # beside the live weights: a resumed run continues both exactly
                torch.save(ema.state_dict(), tmp / EMA_NAME)
            version, internal, gauss = random.getstate()
            torch.save({"torch": torch.get_rng_state(), "python": torch.tensor(internal, dtype=torch.int64),
                        **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})},
                       tmp / "rng_state.pt")
            (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2))  # written last: marks it complete
    except (OSError, RuntimeError) as e:  # a full disk or a file size limit; torch wraps some as RuntimeError
        kept = list_checkpoints(out)
        raise WriteError(f"could not write {final} ({write_failure(e)}); the last good checkpoint, "
                         f"{kept[-1].name if kept else 'none'}, is kept. Free space, then run the same command with "
                         f"--resume_from_checkpoint latest") from None
    # Prune only now that the new checkpoint is complete.
    if total_limit is not None:
        for old in list_checkpoints(out)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    if os.environ.get(KILL_AFTER_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)  # a crash at a known point, for the kill -9 resume test
    return final


def write_failure(e: BaseException) -> str:
    """Why a write failed, in words: errno's text, or what torch.save's errno-less error means."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror  # "No space left on device", "File too large"
    # torch.save's zip writer reports a failed write as a RuntimeError without errno
    # ("[enforce fail at inline_container.cc] unexpected pos ...")
    return "a file write failed: the disk is full or a file size limit was reached"


def load_checkpoint(path: Path, load_weights, optimizer, lr_scheduler, scaler=None, ema=None) -> dict:
    load_weights(path)
    if ema is not None:  # check_checkpoint made sure the file is there
        ema.load_state_dict(torch.load(path / EMA_NAME, weights_only=True, map_location="cpu"))
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
