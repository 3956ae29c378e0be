"""Image files on disk: subject photos, generated images, and which prompt made each.

A generated image is `<prompt>_<seed>.png`, e.g. `a sks dog in the jungle_0.png`, with the
prompt, seed and generation settings also in its PNG text chunks. A folder of images made
elsewhere (--images_dir) is tied to its prompts in one of two ways:

  manifest.jsonl   one JSON object per line: {"file": "x.png", "prompt": "a sks dog", "seed": 0}
                   ("seed" optional; "file" relative to the folder). Used when present.
  file names       otherwise: `<prompt>_<seed>.<ext>` or `<prompt>.<ext>`.

Our own output folders hold both, so they are valid --images_dir folders themselves.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .protocol import Prompt, check_prompt_text
from ..errors import BadInput, NotFound

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST = "manifest.jsonl"
_NAME = re.compile(r"^(?P<prompt>.*)_(?P<seed>\d+)$")


@dataclass(frozen=True)
class GeneratedImage:
    path: Path
    prompt: Prompt
    seed: int | None


def image_name(prompt: Prompt, seed: int) -> str:
    return f"{prompt.text}_{seed}.png"


def list_images(folder: Path, flag: str) -> list[Path]:
    """Image files directly in `folder`, sorted; one warning names every file that cannot be read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFound(f"{flag} {folder}: no such folder")
    good, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(path) as image:
                image.load()  # decode now: a truncated file fails here, not mid-run
            good.append(path)
        except Exception as e:  # any decoder failure: the file cannot be scored
            skipped.append(f"{path.name}: {type(e).__name__}: {e}")
    if skipped:
        warnings.warn(f"{flag} {folder}: skipped {len(skipped)} unreadable file(s): " + "; ".join(skipped),
                      UserWarning, stacklevel=2)
    if not good:
        raise BadInput(f"{flag} {folder}: no readable image ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return good


def save_image(image: Image.Image, path: Path, metadata: dict) -> None:
    """Write atomically (a crash never leaves a half image that resume would trust)."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, json.dumps(value) if not isinstance(value, str) else value)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def write_manifest(folder: Path, images: list[GeneratedImage]) -> Path:
    lines = [json.dumps({"file": im.path.name, "prompt": im.prompt.text, "seed": im.seed,
                         **({"template": im.prompt.template} if im.prompt.template is not None else {})})
             for im in images]
    path = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> list[GeneratedImage]:
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
        images.append(GeneratedImage(image, Prompt(" ".join(str(text).split()), entry.get("template")),
                                     None if seed is None else int(seed)))
    if not images:
        raise BadInput(f"{path}: the manifest lists no image")
    return images


def read_images_dir(folder: Path, flag: str = "--images_dir") -> list[GeneratedImage]:
    """Every image of `folder` with its prompt (manifest first, else file names)."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return read_manifest(folder)
    images = []
    for path in list_images(folder, flag):
        m = _NAME.match(path.stem)
        text, seed = (m["prompt"], int(m["seed"])) if m else (path.stem, None)
        check_prompt_text(text)
        images.append(GeneratedImage(path, Prompt(" ".join(text.split())), seed))
    return images


def file_digest(path: Path) -> str:
    """Content hash: caches notice a regenerated or replaced image whatever its timestamps."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()
