"""Phase 2: generate the images that are not on disk yet, sharded over processes.

The unit of work is one image: (subject, method, prompt, seed). Every process lists the
missing units, waits until all have listed them (so no one sees another's new files), then
takes every num_processes-th one. An image is written atomically, so a killed run resumes
by generating only what is missing. Each seed has its own CPU generator: an image does not
depend on which process made it or on what else was in its batch, up to float rounding.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch

from .config import EvalConfig
from .images import GeneratedImage, file_digest, image_name, save_image, write_manifest
from .plan import ADAPTER, IMAGES, Plan, Subject
from .protocol import Prompt
from ..errors import BadInput

SETTINGS = "settings.json"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Unit:
    subject: str
    method: str
    prompt: Prompt
    seed: int


def images_folder(out: Path, subject: str, method: str) -> Path:
    return Path(out) / "images" / subject / method


def unit_path(out: Path, unit: Unit) -> Path:
    return images_folder(out, unit.subject, unit.method) / image_name(unit.prompt, unit.seed)


def all_units(plan: Plan, cfg: EvalConfig) -> list[Unit]:
    """Subject by subject, method by method, so a process switches adapters rarely."""
    return [Unit(s.name, method, p, seed) for s in plan.subjects if not s.existing
            for method in s.methods(cfg.baseline) for p in s.prompts for seed in cfg.seeds]


def generation_settings(plan: Plan, cfg: EvalConfig, subject: Subject, method: str) -> dict:
    """What an image depends on besides its prompt and seed; resuming with other settings is refused."""
    adapter = subject.adapter if method == ADAPTER else None
    return {"base": plan.base, "adapter": str(adapter) if adapter else None,
            "adapter_sha1": file_digest(adapter) if adapter else None,
            "scale": cfg.scale if adapter else None, "steps": cfg.steps, "guidance": cfg.guidance,
            "negative_prompt": cfg.negative_prompt, "resolution": cfg.resolution,
            "mixed_precision": cfg.mixed_precision}


def check_settings(plan: Plan, cfg: EvalConfig) -> dict[tuple[str, str], dict]:
    """(subject, method) -> settings; raises if images on disk were made with other ones."""
    found = {}
    for subject in plan.subjects:
        for method in () if subject.existing else subject.methods(cfg.baseline):
            settings = generation_settings(plan, cfg, subject, method)
            path = images_folder(cfg.out, subject.name, method) / SETTINGS
            if path.is_file():
                old = json.loads(path.read_text())
                changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
                if changed:
                    diff = "; ".join(f"{k}: {a!r} on disk, {b!r} now" for k, (a, b) in changed.items())
                    raise BadInput(f"{path.parent} holds images made with other settings ({diff}); pass another "
                                     f"--out, or delete that folder to regenerate them")
            found[(subject.name, method)] = settings
    return found


def write_settings(out: Path, settings: dict[tuple[str, str], dict]) -> None:
    for (subject, method), values in settings.items():
        path = images_folder(out, subject, method) / SETTINGS
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{SETTINGS}.tmp")  # other processes may be reading it right now
            tmp.write_text(json.dumps(values, indent=2))
            os.replace(tmp, path)


@contextlib.contextmanager
def adapter_applied(pipe, adapter: Path | None, scale: float):
    """The pipeline with `adapter` loaded for the block, exactly the base model again after it."""
    from ..adapters import apply_adapter, remove_adapter

    if adapter is None:
        yield
        return
    apply_adapter(pipe, adapter, scale)
    try:
        yield
    finally:
        remove_adapter(pipe)


def load_base(plan: Plan, cfg: EvalConfig, device):
    from ..pipelines import load_pipeline
    from ..training.build import resolve_base

    return load_pipeline(resolve_base(plan.base), dtype=DTYPES[cfg.mixed_precision], device=device)


def render_batch(pipe, units: list[Unit], cfg: EvalConfig):
    """One forward batch; a CPU generator per image, as generate.render uses for one."""
    generators = [torch.Generator("cpu").manual_seed(u.seed) for u in units]
    negative = [cfg.negative_prompt] * len(units) if cfg.negative_prompt else None
    return pipe([u.prompt.text for u in units], negative_prompt=negative, num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance, width=cfg.resolution, height=cfg.resolution,
                generator=generators).images


def generate(pipe, units: list[Unit], plan: Plan, cfg: EvalConfig, process: tuple[int, int], progress=None) -> int:
    """Render and save `units` (this process's share); returns how many images were written.

    Each image is logged to logs/generated.<rank>.jsonl, so a run can be audited (and a
    test can check that no (subject, prompt, seed) was made twice across processes).
    """
    out = Path(cfg.out)
    subjects = {s.name: s for s in plan.subjects}
    log = out / "logs" / f"generated.{process[0]}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    for (subject, method), group in groupby(units, key=lambda u: (u.subject, u.method)):
        group = list(group)
        adapter = subjects[subject].adapter if method == ADAPTER else None
        with adapter_applied(pipe, adapter, cfg.scale):
            for first in range(0, len(group), cfg.batch_size):
                batch = group[first:first + cfg.batch_size]
                for unit, image in zip(batch, render_batch(pipe, batch, cfg)):
                    path = unit_path(out, unit)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_image(image, path, {"prompt": unit.prompt.text, "seed": unit.seed, "subject": subject,
                                             "method": method, "adapter": str(adapter) if adapter else "",
                                             "base": plan.base, "steps": cfg.steps, "guidance": cfg.guidance,
                                             "negative_prompt": cfg.negative_prompt or "", "scale": cfg.scale})
                    with log.open("a") as f:
                        f.write(json.dumps({"subject": subject, "method": method, "prompt": unit.prompt.text,
                                            "seed": unit.seed, "process": list(process), "time": time.time()}) + "\n")
                    written += 1
                    if progress is not None:
                        progress.update(1)
    return written


def generated_images(plan: Plan, cfg: EvalConfig) -> dict[tuple[str, str], list[GeneratedImage]]:
    """(subject, method) -> its images in prompt, seed order: the planned ones, or the existing ones."""
    found: dict[tuple[str, str], list[GeneratedImage]] = {}
    for unit in all_units(plan, cfg):
        found.setdefault((unit.subject, unit.method), []).append(
            GeneratedImage(unit_path(cfg.out, unit), unit.prompt, unit.seed))
    for subject in plan.subjects:
        if subject.existing:
            found[(subject.name, subject.methods(cfg.baseline)[0])] = list(subject.existing)
    return found


def write_manifests(plan: Plan, cfg: EvalConfig) -> None:
    """manifest.jsonl in each generated folder: the folder is then a valid --images_dir."""
    for (subject, method), images in generated_images(plan, cfg).items():
        if method != IMAGES:
            write_manifest(images_folder(cfg.out, subject, method), images)
