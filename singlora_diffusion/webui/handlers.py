"""What each control of the web UI does, as plain functions of an AppState and the form's values.

No Gradio here: tests and scripts call these directly. A user mistake raises a UserError
(BadRequest for the form's own checks); callbacks.py shows it as a message. Return values
are plain (paths, strings, captions); callbacks.py turns them into Gradio updates.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..bundled import resolve_data_dir
from ..files import write_text
from .defaults import profile
from .engine import MAX_REQUEST_SECONDS, Engine
from .jobs import (PRESETS, PRODIGY_LR, TrainingJob, check_args, class_args, optimizer_problems, optimizers,
                   preset_subject, thread_share, trainer_args)
from .requests import (CAPTION_SUFFIX, MAX_IMAGES, MAX_STEPS, BadRequest, GenerateRequest, TrainRequest,
                       captions_beside, confine, scrub_paths, split_upload, subject_folder, unique_dir, whole)


@dataclass
class AppState:
    """What every handler shares: one per app, for all its users."""
    engine: Engine
    adapters_dir: Path                # adapters are listed from here; runs, uploads, evaluations go here
    server_threads: int               # CPU threads for renders while a training runs...
    trainer_threads: int              # ...and for the trainer (thread_share)
    job: TrainingJob | None = None    # the latest training run

    def training(self) -> bool:
        return self.job is not None and self.job.status().state == "running"


def open_state(base: str, adapters_dir: str | Path, work_dir: str | Path | None = None,
               max_request_seconds: float | None = None, compile: bool = False) -> AppState:
    """The base loaded, the adapters folder made; generated images go to work_dir/images."""
    adapters_dir = Path(adapters_dir).resolve()
    adapters_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work_dir or adapters_dir / "webui").resolve()
    engine = Engine(base, work_dir / "images", max_seconds=max_request_seconds or MAX_REQUEST_SECONDS,
                    compile=compile)
    return AppState(engine, adapters_dir, *thread_share(os.cpu_count() or 1))


def list_adapters(adapters_dir: Path) -> list[str]:
    """Adapter files under adapters_dir, as paths relative to it (training outputs included).

    Only files whose header says adapter (a SingLoRA file or LoRA keys): evaluation
    caches and other tensors are .safetensors too. Checkpoints are left out.
    """
    from ..adapters import adapter_kind

    def listed(p: Path) -> bool:
        parts = p.relative_to(adapters_dir).parts
        # checkpoints, and hidden files and folders (uploads being written)
        return not any(part.startswith(("checkpoint-", ".")) for part in parts) and adapter_kind(p) is not None
    found = sorted(p for p in adapters_dir.rglob("*.safetensors") if listed(p))
    return [str(p.relative_to(adapters_dir)) for p in found]


def picker_choices(state: AppState) -> list[str]:
    """The Generate tab's picker: "" (the base model alone), then every adapter."""
    return [""] + list_adapters(state.adapters_dir)


def _uploaded(file) -> Path:
    """Gradio hands an uploaded file over as a path or as a tempfile wrapper."""
    return Path(file if isinstance(file, str) else file.name)


# -- Generate tab ------------------------------------------------------------------------
def picked(state: AppState) -> str:
    """The loaded adapter as the picker names it; "" for none or one outside the adapters folder."""
    a = state.engine.adapter
    return str(a.relative_to(state.adapters_dir)) if a is not None and state.adapters_dir in a.parents else ""


def status_line(state: AppState) -> str:
    """What is really loaded, with what a partial load left out."""
    engine = state.engine
    if engine.adapter is None:
        return "Adapter: none (base model)"
    return f"Adapter: {picked(state) or engine.adapter.name}" + (f" ({engine.note})" if engine.note else "")


def choose_base(state: AppState, base_id: str) -> tuple[str, str]:
    """(the picker's value, the status): a new base drops the adapter, and the picker says so."""
    state.engine.load_base((base_id or "").strip())  # waits for a running generation (engine lock)
    return picked(state), status_line(state)


def choose_adapter(state: AppState, name: str, allow_partial: bool = False) -> str:
    state.engine.set_adapter(confine(state.adapters_dir, name) if name else None, bool(allow_partial))
    return status_line(state)


def upload_adapter(state: AppState, file, allow_partial: bool = False) -> tuple[str | None, str]:
    """(the stored file's name for the picker, or None when no file came; the status)."""
    if file is None:
        return None, "No file."
    dest = state.engine.add_upload(_uploaded(file), state.adapters_dir / "uploads", bool(allow_partial))
    return str(dest.relative_to(state.adapters_dir)), status_line(state)


def _share_threads(state: AppState) -> None:
    state.engine.threads = state.server_threads if state.training() else None  # the trainer has the other cores


def generate(state: AppState, req: GenerateRequest, report=None) -> list[tuple[str, str]]:
    """(image path, caption) for each image; report(done, total) after each denoising step."""
    _share_threads(state)
    return [(str(p), f"seed {req.seed}") for p in state.engine.generate(req, report)]


def compare(state: AppState, req: GenerateRequest, report=None) -> list[tuple[str, str]]:
    """The base model's images, then the adapter's, with the same seed and settings."""
    _share_threads(state)
    base, adapted = state.engine.compare(req, report)
    return [(str(p), "base") for p in base] + [(str(p), "adapter") for p in adapted]


def cancel_generation(state: AppState) -> str:
    return "Cancelling after this step." if state.engine.cancel() else "Nothing is being generated."


# -- Train tab ---------------------------------------------------------------------------
def _training_subject(state: AppState, photos, folder: str, preset: str) -> Path | str | None:
    """The run's photos when none were uploaded (None when they were): the typed folder (inside
    the adapters folder, or bundled:NAME), else the preset's own subject (bundled:NAME, the demo's
    toy subject), as the trainer takes the YAML's when no flag overrides it."""
    if photos:
        return None
    if folder:
        data = subject_folder(state.adapters_dir, folder)
        if not data.is_dir():
            raise BadRequest(f"{folder!r} is not a folder inside the adapters folder.")
        return data
    own = preset_subject(preset)
    if own is None:
        raise BadRequest(f"Upload 3-10 photos or give a folder (the {preset} preset ships no subject of its own).")
    return own


def start_training(state: AppState, photos, folder: str, req: TrainRequest) -> str:
    """Start a training run in a background process, in a run folder of its own under runs/.

    Uploaded captions (a.txt for a.jpg) are saved beside their images and the run reads them
    (--caption_extension .txt); so does a typed folder, or the preset's own subject, with
    captions beside its images. No photos and no folder: the preset's own subject, if it has one.
    """
    if state.training():
        raise BadRequest("A training run is already going; cancel it or wait.")
    if req.preset not in PRESETS:
        raise BadRequest(f"Pick a preset: {', '.join(PRESETS)}.")
    if req.optimizer not in optimizers():
        raise BadRequest(f"Pick an optimizer: {', '.join(optimizers())} (got {req.optimizer!r}).")
    if req.optimizer in optimizer_problems():
        raise BadRequest(f"{optimizer_problems()[req.optimizer]}; pick another optimizer.")
    extra = class_args(req.preset, req.class_name, state.adapters_dir)
    data = _training_subject(state, photos, folder, req.preset)
    if data is None:
        images, captions = split_upload([_uploaded(f) for f in photos])
        if not images:
            raise BadRequest("Only captions were uploaded; upload the subject photos with them.")
    else:
        images, captions = None, captions_beside(Path(resolve_data_dir(str(data))))
    photo_dir = data or Path("photos")  # the run's own folder; its final path is known once the run folder is
    check_args(trainer_args(req, photo_dir, bool(captions), extra))  # the trainer's own checks, before any folder
    # everything checked: only now a run folder exists
    run = unique_dir(state.adapters_dir / "runs", time.strftime("%Y%m%d-%H%M%S"))
    if data is None:
        data = run / "photos"
        data.mkdir()
        for src in images:
            shutil.copyfile(src, data / src.name)
        for stem, text in captions.items():  # the checked text, as UTF-8, where the trainer looks: a.jpg -> a.txt
            write_text(data / f"{stem}{CAPTION_SUFFIX}", text + "\n")
    state.job = TrainingJob(run, trainer_args(req, data, bool(captions), extra), threads=state.trainer_threads)
    on = f" on the {req.preset} preset's own subject ({data})" if isinstance(data, str) else ""
    return f"Training in {run.relative_to(state.adapters_dir)}{on} ..." + (
        f" ({len(captions)} caption{'s' * (len(captions) > 1)})" if captions else "")


def optimizer_changed(optimizer: str, learning_rate) -> tuple[float | None, str]:
    """(the learning-rate field, a note) when the optimizer dropdown changes."""
    if optimizer == "prodigy":
        return PRODIGY_LR, (f"Learning rate set to {PRODIGY_LR:g}: Prodigy estimates its step size itself, and "
                            f"its learning rate only scales that estimate.")
    if learning_rate == PRODIGY_LR:
        return None, (f"Learning rate back to the preset's: {PRODIGY_LR:g} was Prodigy's multiplier, far too "
                      f"large for {optimizer}.")
    return learning_rate, ""


def optimizer_note() -> str:
    """What the optimizer dropdown leaves out on this machine, and why."""
    return "; ".join(optimizer_problems().values())


def training_status(state: AppState) -> tuple[str, str, str | None]:
    """(progress text, an HTML progress bar, the latest validation image), polled every second."""
    if state.job is None:
        return "No training run yet.", "", None
    s = state.job.status()
    text = f"{s.state}: step {s.step}/{s.total}" + (f", loss {s.loss:.4f}" if s.loss is not None else "")
    if s.message:
        text += f"\n{scrub_paths(s.message, state.adapters_dir)}"
    if s.state == "finished":
        text += "\nThe adapter is in the Generate tab's list (refresh it)."
    bar = f'<progress value="{s.step}" max="{max(s.total, 1)}" style="width:100%"></progress>'
    return text, bar, s.validation_image


def cancel_training(state: AppState) -> str:
    if state.job is not None:
        state.job.cancel()
    return "Cancelling: a checkpoint is saved first."


# -- Evaluate tab ------------------------------------------------------------------------
def run_evaluation(state: AppState, adapter_name: str, subject: str, class_name: str, prompts_text: str,
                   num_images, steps, random_weights: bool) -> tuple[str, str, str]:
    """(report.md's text, per_prompt.png, grid.png) of an evaluation in evaluations/<time>/.

    DreamBench's metrics, or on the toy base the toy scorer's (defaults.py decides, by base).
    """
    if not adapter_name:
        raise BadRequest("Pick an adapter to evaluate.")
    num_images = whole("images per prompt", num_images, 1, MAX_IMAGES)
    steps = whole("steps", steps, 1, MAX_STEPS)
    subject_dir = subject_folder(state.adapters_dir, subject) if subject else None
    if subject_dir is None or not subject_dir.is_dir():
        raise BadRequest("Give the folder of the subject's real photos inside the adapters folder "
                         "(or a shipped one: bundled:toy_subject, bundled:dog3).")
    adapter = confine(state.adapters_dir, adapter_name)
    from ..evaluation import EvalConfig, evaluate  # the scoring models' packages load only when used

    out = unique_dir(state.adapters_dir / "evaluations", time.strftime("%Y%m%d-%H%M%S"))
    prompts = "dreambench"  # EvalConfig's default list: DreamBench's, or the toy one with the toy scorer
    if (prompts_text or "").strip():
        prompts = str(write_text(out / "prompts.txt", prompts_text.strip() + "\n"))
    suited = profile(state.engine.base)
    # the evaluation's own errors (a missing scoring model, a bad photo) are UserErrors: shown as they are
    cfg = EvalConfig(out=str(out), subject_dir=str(subject_dir), class_name=class_name or None,
                     adapter=str(adapter), base=state.engine.base, prompts=prompts, num_images=num_images,
                     steps=steps, guidance=suited.guidance, scorer=suited.scorer,
                     allow_random_weights=bool(random_weights))
    files = evaluate(cfg)
    return files["report.md"].read_text(), str(files["per_prompt.png"]), str(files["grid.png"])
