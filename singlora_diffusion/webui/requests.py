"""What a user may ask for, checked before any work: a message, never a traceback."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

MAX_SIDE, MAX_IMAGES, MAX_STEPS = 2048, 8, 150


class BadRequest(ValueError):
    """A user mistake; its message is shown in the UI as is."""


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
            value = getattr(self, name)
            if value is None or int(value) != value or not low <= value <= high:
                raise BadRequest(f"{name.replace('_', ' ')} must be a whole number from {low} to {high}, got {value}.")
            setattr(self, name, int(value))
        for name in ("width", "height"):
            if getattr(self, name) % 8:
                raise BadRequest(f"{name} must be divisible by 8 (the VAE works on 8x8 blocks), "
                                 f"got {getattr(self, name)}.")
        if not 0 <= float(self.guidance) <= 30:
            raise BadRequest(f"guidance must be between 0 and 30, got {self.guidance}.")
        if not 0 <= float(self.strength) <= 1.5:
            raise BadRequest(f"adapter strength must be between 0 and 1.5, got {self.strength}.")
        self.seed = int(self.seed) % 2 ** 32

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
        raise BadRequest(f"{user_path!r} is outside the allowed folder {root}; pick a path inside it.")
    return path
