"""Phase 2: the images to score. Their names and manifests, reading folders of images made
elsewhere, and generating the ones that are not on disk yet.

One record, GeneratedImage, is one image: (subject, method, prompt, seed) and its file.
Ours are `images/<subject>/<method>/<prompt>_<seed>.png`, e.g. `a sks dog in the jungle_0.png`,
with the prompt, seed and generation settings also in its PNG text chunks. A folder of images
made elsewhere (--images_dir) is tied to its prompts in one of two ways:

  manifest.jsonl   one JSON object per line: {"file": "x.png", "prompt": "a sks dog", "seed": 0}
                   ("seed" optional; "file" relative to the folder). Used when present.
  file names       otherwise: `<prompt>_<seed>.<ext>` or `<prompt>.<ext>`.

Our own output folders hold both, so they are valid --images_dir folders themselves.

Generating: every process lists the missing images, waits until all have listed them (so
no one sees another's new files), then takes every num_processes-th one (run.py). An image
is written atomically, so a killed run resumes by generating only what is missing. Each
seed has its own CPU generator: an image does not depend on which process made it or on
what else was in its batch, up to float rounding.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import BadInput, NotFound
from ..files import atomic_path, write_json, write_text
from .config import EvalConfig
from .protocol import Prompt, check_prompt_text

if TYPE_CHECKING:
    from .plan import Plan, Subject

BASE, ADAPTER, IMAGES = "base", "adapter", "images"  # methods (image folders), in report order
MANIFEST = "manifest.jsonl"
SETTINGS = "settings.json"
_NAME = re.compile(r"^(?P<prompt>.*)_(?P<seed>\d+)$")


@dataclass(frozen=True)
class GeneratedImage:
    subject: str
    method: str          # BASE, ADAPTER, or IMAGES for images made elsewhere
    prompt: Prompt
    seed: int | None     # None: an --images_dir file that names no seed
    path: Path


def file_digest(path: Path) -> str:
    """Content hash: caches notice a regenerated or replaced image whatever its timestamps."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


# -- names and manifests ----------------------------------------------------------------------

def image_name(prompt: Prompt, seed: int) -> str:
    return f"{prompt.text}_{seed}.png"


def images_folder(out: Path, subject: str, method: str) -> Path:
    return Path(out) / "images" / subject / method


def write_manifest(folder: Path, images: list[GeneratedImage]) -> Path:
    lines = [json.dumps({"file": im.path.name, "prompt": im.prompt.text, "seed": im.seed,
                         **({"template": im.prompt.template} if im.prompt.template is not None else {})})
             for im in images]
    return write_text(folder / MANIFEST, "\n".join(lines) + "\n")


def read_manifest(folder: Path, subject: str) -> list[GeneratedImage]:
    path = folder / MANIFEST
    images = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            file, text = entry["file"], entry["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BadInput(f"{path}:{n}: expected {{\"file\": ..., \"prompt\": ..., \"seed\": ...}}, got {line!r} "
                           f"({e})") from None
        image = folder / file
        if not image.is_file():
            raise NotFound(f"{path}:{n}: image {file!r} does not exist in {folder}")
        seed = entry.get("seed")
        images.append(GeneratedImage(subject, IMAGES, Prompt(" ".join(str(text).split()), entry.get("template")),
                                     None if seed is None else int(seed), image))
    if not images:
        raise BadInput(f"{path}: the manifest lists no image")
    return images


def read_images_dir(folder: Path, subject: str, flag: str = "--images_dir") -> list[GeneratedImage]:
    """Every image of `folder` with its prompt (manifest first, else file names)."""
    from ..images import scan_images

    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return read_manifest(folder, subject)
    images = []
    # our own folders also hold the manifest and the settings: they belong there, no warning
    for path in scan_images(folder, flag, "generated images", ignore=(MANIFEST, SETTINGS)):
        m = _NAME.match(path.stem)
        text, seed = (m["prompt"], int(m["seed"])) if m else (path.stem, None)
        check_prompt_text(text)
        images.append(GeneratedImage(subject, IMAGES, Prompt(" ".join(text.split())), seed, path))
    return images


def planned_images(plan: Plan, cfg: EvalConfig) -> list[GeneratedImage]:
    """Every image to generate, subject by subject, method by method (a process switches adapters rarely)."""
    return [GeneratedImage(s.name, method, p, seed, images_folder(cfg.out, s.name, method) / image_name(p, seed))
            for s in plan.subjects if not s.existing
            for method in s.methods(cfg.baseline) for p in s.prompts for seed in cfg.seeds]


def generated_images(plan: Plan, cfg: EvalConfig) -> dict[tuple[str, str], list[GeneratedImage]]:
    """(subject, method) -> its images in prompt, seed order: the planned ones, or the existing ones."""
    found: dict[tuple[str, str], list[GeneratedImage]] = {}
    for image in planned_images(plan, cfg):
        found.setdefault((image.subject, image.method), []).append(image)
    for subject in plan.subjects:
        if subject.existing:
            found[(subject.name, IMAGES)] = list(subject.existing)
    return found


def write_manifests(plan: Plan, cfg: EvalConfig) -> None:
    """manifest.jsonl in each generated folder: the folder is then a valid --images_dir."""
    for (subject, method), images in generated_images(plan, cfg).items():
        if method != IMAGES:
            write_manifest(images_folder(cfg.out, subject, method), images)


# -- settings: what an image depends on besides its prompt and seed ---------------------------

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
            write_json(path, values, indent=2)  # atomic: other processes may be reading it right now


# -- generating -------------------------------------------------------------------------------

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
    from ..pipelines import DTYPES, load_pipeline

    return load_pipeline(plan.base, dtype=DTYPES[cfg.mixed_precision], device=device)


def render_batch(pipe, images: list[GeneratedImage], cfg: EvalConfig):
    """One forward batch; a CPU generator per image, as generate.render uses for one."""
    generators = [torch.Generator("cpu").manual_seed(im.seed) for im in images]
    negative = [cfg.negative_prompt] * len(images) if cfg.negative_prompt else None
    return pipe([im.prompt.text for im in images], negative_prompt=negative, num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance, width=cfg.resolution, height=cfg.resolution,
                generator=generators).images


def save_image(image, path: Path, metadata: dict) -> None:
    """Write atomically (a crash never leaves a half image that resume would trust)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, json.dumps(value) if not isinstance(value, str) else value)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)  # the temporary's name ends in .tmp


def generate(pipe, images: list[GeneratedImage], plan: Plan, cfg: EvalConfig, process: tuple[int, int],
             progress=None) -> int:
    """Render and save `images` (this process's share); returns how many images were written.

    Each image is logged to logs/generated.<rank>.jsonl, so a run can be audited (and a
    test can check that no (subject, prompt, seed) was made twice across processes).
    """
    subjects = {s.name: s for s in plan.subjects}
    log = Path(cfg.out) / "logs" / f"generated.{process[0]}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    for (subject, method), group in groupby(images, key=lambda im: (im.subject, im.method)):
        group = list(group)
        adapter = subjects[subject].adapter if method == ADAPTER else None
        settings = {"subject": subject, "method": method, "adapter": str(adapter) if adapter else "",
                    "base": plan.base, "steps": cfg.steps, "guidance": cfg.guidance,
                    "negative_prompt": cfg.negative_prompt or "", "scale": cfg.scale}
        with adapter_applied(pipe, adapter, cfg.scale):
            for first in range(0, len(group), cfg.batch_size):
                batch = group[first:first + cfg.batch_size]
                for im, image in zip(batch, render_batch(pipe, batch, cfg)):
                    save_image(image, im.path, {"prompt": im.prompt.text, "seed": im.seed, **settings})
                    with log.open("a") as f:
                        f.write(json.dumps({"subject": subject, "method": method, "prompt": im.prompt.text,
                                            "seed": im.seed, "process": list(process), "time": time.time()}) + "\n")
                    written += 1
                    if progress is not None:
                        progress.update(1)
    return written
