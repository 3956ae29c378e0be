"""What a user may ask for, checked before any work: a message, never a traceback."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import images
from ..bundled import BUNDLED_PREFIX, bundled_subject
from ..config import ADAPTERS
from ..errors import BadInput

MIN_SIDE, MAX_SIDE = 32, 2048  # 32: the toy base's own size (toy:shapes), the smallest any base here draws
MAX_IMAGES, MAX_STEPS = 8, 150
MAX_TRAIN_STEPS = 100_000
CAPTION_SUFFIX = ".txt"          # the Train tab's captions: a.txt beside a.jpg (the trainer's --caption_extension)
MAX_CAPTION_BYTES = 64 * 2 ** 10  # a caption is a line or two; anything larger is the wrong file


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
        for name, low, high in (("steps", 1, MAX_STEPS), ("num_images", 1, MAX_IMAGES),
                                ("width", MIN_SIDE, MAX_SIDE), ("height", MIN_SIDE, MAX_SIDE)):
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


@dataclass
class TrainRequest:
    """The Train tab's settings, checked as form fields; the trainer's TrainConfig checks them again as flags.

    None or 0 in an optional number means "not given": the preset's (or the trainer's) value stands.
    (The browser shows a blank number field as 0, so 0 must read as blank too; it is no learning
    rate, bucket side or EMA decay anyone can mean.)
    """
    instance_prompt: str = ""  # blank: the preset's (the demo's "a sks shape")
    class_name: str = ""
    preset: str = "demo"
    steps: int = 300
    adapter: str = "singlora"
    loraplus_lr_ratio: float | None = None
    optimizer: str = "adamw"
    learning_rate: float | None = None
    enable_bucket: bool = False
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int | None = None
    caption_dropout_rate: float = 0.0
    use_ema: bool = False
    ema_decay: float | None = None

    def __post_init__(self):
        self.instance_prompt = (self.instance_prompt or "").strip()
        self.class_name = (self.class_name or "").strip()
        self.steps = whole("steps", self.steps, 1, MAX_TRAIN_STEPS)
        if self.adapter not in ADAPTERS:
            raise BadRequest(f"Pick an adapter: {', '.join(ADAPTERS)} (got {self.adapter!r}).")
        self.caption_dropout_rate = between("caption dropout rate", self.caption_dropout_rate or 0.0, 0, 1)
        for name in ("learning_rate", "ema_decay", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            if getattr(self, name) == 0:
                setattr(self, name, None)
        for name, low, high in (("learning_rate", 1e-12, 10), ("loraplus_lr_ratio", 1e-3, 1e3),
                                ("ema_decay", 1e-6, 1 - 1e-9)):
            if getattr(self, name) is not None:
                setattr(self, name, between(name.replace("_", " "), getattr(self, name), low, high))
        for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            if getattr(self, name) is not None:
                setattr(self, name, whole(name.replace("_", " "), getattr(self, name), 8, 8192))
        self.enable_bucket, self.use_ema = bool(self.enable_bucket), bool(self.use_ema)


def read_caption(path: Path) -> str:
    """A caption file's text: small, UTF-8 (a BOM is dropped), not empty; named in every refusal."""
    if path.stat().st_size > MAX_CAPTION_BYTES:
        raise BadRequest(f"{path.name} is {path.stat().st_size / 2**10:.0f} KB; a caption file may hold at most "
                         f"{MAX_CAPTION_BYTES // 2**10} KB: give one short description per image.")
    try:
        return images.read_caption(path, shown=path.name)  # the trainer's rule: UTF-8, not empty
    except BadInput as e:
        raise BadRequest(str(e)) from None


def split_upload(files: list[Path]) -> tuple[list[Path], dict[str, str]]:
    """(the images, {image stem: caption}) of the Train tab's upload, every caption checked.

    A caption goes with the image of the same stem (a.jpg + a.txt): one whose stem names
    no uploaded image is refused, as is a name uploaded twice (one would overwrite the other).
    """
    seen: set[str] = set()
    for f in files:
        if f.name in seen:
            raise BadRequest(f"Two uploaded files are named {f.name}; rename one.")
        seen.add(f.name)
    images = [f for f in files if f.suffix.lower() != CAPTION_SUFFIX]
    stems = {f.stem for f in images}
    captions = {}
    for f in files:
        if f.suffix.lower() == CAPTION_SUFFIX:
            if f.stem not in stems:
                raise BadRequest(f"{f.name} names no uploaded image: a caption goes with the image of the same "
                                 f"name ({f.stem}.jpg + {f.stem}{CAPTION_SUFFIX}); upload that image or rename it.")
            captions[f.stem] = read_caption(f)
    return images, captions


def captions_beside(folder: Path) -> dict[str, str]:
    """{image stem: caption} of a typed training folder's .txt files that sit beside an image, checked.

    A .txt that matches no file is left alone here (a folder may hold notes); the trainer never reads it.
    """
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    stems = {p.stem for p in files if p.suffix.lower() != CAPTION_SUFFIX}
    return {p.stem: read_caption(p) for p in sorted(files) if p.suffix == CAPTION_SUFFIX and p.stem in stems}


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


def subject_folder(root: str | Path, user_path: str) -> Path:
    """A folder of subject photos as the user named it: bundled:NAME (a subject shipped in the
    package, read-only, e.g. bundled:toy_subject) or a path confined to `root`."""
    if not user_path.startswith(BUNDLED_PREFIX):
        return confine(root, user_path)
    shipped = bundled_subject("")  # the package's assets folder
    folder = confine(shipped, user_path[len(BUNDLED_PREFIX):])
    if folder == shipped.resolve() or not folder.is_dir():
        raise BadRequest(f"{user_path!r} is no subject shipped with the package; bundled:NAME names a folder of "
                         f"its assets, e.g. bundled:toy_subject or bundled:dog3.")
    return folder


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
