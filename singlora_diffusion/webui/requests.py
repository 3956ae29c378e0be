"""What a user may ask for, checked before any work: a message, never a traceback."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import BadInput

MAX_SIDE, MAX_IMAGES, MAX_STEPS = 2048, 8, 150
MAX_TRAIN_STEPS = 100_000


class BadRequest(BadInput):
    """A user mistake; its message is shown in the UI as is."""


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole(name: str, value, low: int, high: int) -> int:
    """A whole number in [low, high] from a form field (which may hold None, NaN, 1e9 or 2.5)."""
    if not _finite(value) or int(value) != value or not low <= value <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}, got {value}.")
    return int(value)


def between(name: str, value, low: float, high: float) -> float:
    if not _finite(value) or not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}, got {value}.")
    return float(value)


@dataclass
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    num_images: int = 1
    width: int = 512
    height: int = 512
    strength: float = 1.0

    def __post_init__(self):
        self.prompt = (self.prompt or "").strip()
        if not self.prompt:
            raise BadRequest("Type a prompt first.")
        for name, low, high in (("steps", 1, MAX_STEPS), ("num_images", 1, MAX_IMAGES), ("width", 64, MAX_SIDE),
                                ("height", 64, MAX_SIDE)):
            setattr(self, name, whole(name.replace("_", " "), getattr(self, name), low, high))
        for name in ("width", "height"):
            if getattr(self, name) % 8:
                raise BadRequest(f"{name} must be divisible by 8 (the VAE works on 8x8 blocks), "
                                 f"got {getattr(self, name)}.")
        self.guidance = between("guidance", self.guidance, 0, 30)
        self.strength = between("adapter strength", self.strength, 0, 1.5)
        self.seed = whole("seed", self.seed, -2 ** 63, 2 ** 63) % 2 ** 32

    def metadata(self, **extra) -> str:
        return json.dumps({**asdict(self), **extra})


def confine(root: str | Path, user_path: str) -> Path:
    """`user_path` resolved inside `root`; anything that escapes it is refused.

    Relative paths are taken from root; absolute ones must already lie inside it.
    """
    root = Path(root).resolve()
    candidate = Path(user_path or "")
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if path != root and root not in path.parents:
        raise BadRequest(f"{user_path!r} is outside the allowed folder; pick a path inside it.")
    return path


def unique_dir(parent: Path, stem: str) -> Path:
    """parent/stem, or stem-2, stem-3, ...: created here, so two requests in one second never share one."""
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = parent / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise BadRequest(f"too many folders named {stem} in {parent.name}; clean it up")


def scrub_paths(message: str, root: Path) -> str:
    """A message without server paths: paths under `root` become relative ("runs/..."), any other absolute
    path only its last part."""
    import re

    message = message.replace(str(root) + "/", "").replace(str(root), ".")
    return re.sub(r"(?<![\w.])/(?:[^\s'\"():,;]+/)+([^\s'\"():,;/]+)", r"\1", message)
