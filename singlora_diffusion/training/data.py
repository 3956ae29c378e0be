"""The image side of DreamBooth: find usable photos, load them as RGB, turn them into tensors.

Like diffusers' DreamBoothDataset (examples/dreambooth/train_dreambooth_lora.py), but a
folder straight from a phone or a download does not crash step 0 or train on garbage:

    folder --scan_images--> good paths --load_image--> RGB PIL --prepare_image--> (3, r, r) in [-1, 1] + Crop
             (one warning     (EXIF turned, CMYK,       (resize short side, crop, maybe flip)
              for the rest)    16-bit, alpha handled)
"""
from __future__ import annotations

import warnings
from pathlib import Path

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from ..errors import BadInput

_ROLES = ("instance", "class")
_WHITE = (255, 255, 255)


class ImageFolderError(BadInput):
    """A training image folder is missing, empty or holds nothing we can train on."""


def _flag(role: str) -> str:
    if role not in _ROLES:
        raise BadInput(f"role must be one of {_ROLES}, got {role!r}")
    return f"--{role}_data_dir"


def _why_unusable(path: Path) -> str | None:
    """None if `path` is an image PIL can fully decode, else a short reason."""
    if path.name.startswith("."):
        return "hidden file"
    if path.is_dir():
        return "sub-folder, not searched"
    if not path.is_file():
        return "not a regular file"
    if path.stat().st_size == 0:
        return "empty file, 0 bytes"
    try:
        # load(), not just verify(): only decoding the pixel data finds a truncated JPEG.
        # LOAD_TRUNCATED_IMAGES stays off for the same reason.
        with Image.open(path) as image:
            image.load()
    except Image.UnidentifiedImageError:
        return "not an image format Pillow can read"
    except Exception as err:  # any decoder failure means this file cannot be trained on
        return f"corrupt or truncated, {type(err).__name__}: {err}"
    return None


def scan_images(folder, role: str = "instance") -> list[Path]:
    """Sorted usable image files directly in `folder`; one UserWarning lists every file skipped.

    Raises ImageFolderError when the folder is missing, empty or has no readable image.
    Each image is decoded once here so that a bad file fails now, not hours into training.
    """
    flag, folder = _flag(role), Path(folder)
    if not folder.exists():
        raise ImageFolderError(f"{flag} {folder}: folder does not exist; pass the folder that holds "
                               f"your {role} images.")
    if not folder.is_dir():
        raise ImageFolderError(f"{flag} {folder}: is a file, not a folder; pass the folder that holds "
                               f"your {role} images.")
    entries = sorted(folder.iterdir())
    if not entries:
        raise ImageFolderError(f"{flag} {folder}: folder is empty; put your {role} images "
                               f"(.jpg, .png, ...) in it.")
    good, skipped = [], []
    for path in entries:
        reason = _why_unusable(path)
        if reason is None:
            good.append(path)
        else:
            skipped.append(f"{path.name}: {reason}")
    if not good:
        raise ImageFolderError(f"{flag} {folder}: no readable image among {len(entries)} entries "
                               f"[{'; '.join(skipped) or 'only documentation files'}]; add JPEG or "
                               f"PNG photos.")
    if skipped:
        warnings.warn(f"{flag} {folder}: skipped {len(skipped)} of {len(entries)} entries, training "
                      f"on {len(good)} image(s): [" + "; ".join(skipped) + "]", UserWarning, stacklevel=2)
    return good


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips I;16/I values above 255 (almost everything is white);
    # scale instead: 0..65535 -> 0..255 exactly, as 65535 / 257 = 255.
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")


def _onto_white(image: Image.Image) -> Image.Image:
    # Transparent regions have arbitrary (often black) colour underneath; a photo of a
    # cut-out subject should train on a plain white background, not a black one.
    background = Image.new("RGBA", image.size, _WHITE + (255,))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def load_image(path) -> Image.Image:
    """`path` as an upright 8-bit RGB image, whatever its mode (CMYK, 16-bit, palette, alpha)."""
    with Image.open(path) as image:
        # EXIF orientation first: phones store portraits sideways and set this tag.
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L, I (16-bit PNGs may open as I)
        image = _sixteen_bit_to_l(image)
    if "A" in image.getbands() or "transparency" in image.info:  # RGBA, LA, PA, P or L with tRNS
        return _onto_white(image)
    return image.convert("RGB")  # CMYK, L, 1, P, YCbCr: Pillow's own conversions are correct


@dataclass(frozen=True)
class Crop:
    """Where a training crop came from: SDXL's size/crop micro-conditioning (SDXL paper, Sec. 2.2)."""
    original_size: tuple[int, int]   # (height, width) before resizing
    top_left: tuple[int, int]        # (top, left) of the crop in the resized image

    def time_ids(self, resolution: int) -> list[int]:
        return [*self.original_size, *self.top_left, resolution, resolution]


def prepare_image(image: Image.Image, resolution: int, center_crop: bool, flip: bool) -> tuple[torch.Tensor, Crop]:
    """RGB image -> float tensor (3, resolution, resolution) in [-1, 1], and its Crop.

    Shorter side to `resolution` (bicubic, antialiased; small images are upscaled, see
    check_sizes), then a centre or a random square crop (torch's RNG, which the trainer
    seeds per step), then a horizontal flip if `flip`.
    """
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    if resolution < 8:
        raise BadInput(f"resolution must be at least 8 pixels, got {resolution}")
    original = (image.height, image.width)
    # Resize on the PIL image: Pillow rounds and clamps to uint8, so bicubic overshoot
    # cannot push values outside [-1, 1] after normalisation.
    image = TF.resize(image, resolution, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    if center_crop:
        top, left = round((image.height - resolution) / 2), round((image.width - resolution) / 2)
    else:
        top, left, _, _ = v2.RandomCrop.get_params(image, (resolution, resolution))
    width = image.width
    image = TF.crop(image, top, left, resolution, resolution)
    if flip:
        image = TF.horizontal_flip(image)
        left = width - left - resolution  # the crop's position in the mirrored image
    pixels = TF.to_dtype(TF.to_image(image), torch.float32, scale=True) * 2 - 1
    return pixels, Crop(original, (top, left))


def _upright_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:  # header only: no pixels decoded
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that turn by 90 degrees
            width, height = height, width
    return width, height


def check_sizes(paths, resolution: int) -> None:
    """One UserWarning naming every image whose shorter side is below `resolution`.

    Such images are upscaled by prepare_image and train the model on blur.
    """
    paths, small = [Path(p) for p in paths], []
    for path in paths:
        width, height = _upright_size(path)
        if min(width, height) < resolution:
            small.append(f"{path} upscaled from {width}x{height}")
    if small:
        warnings.warn(f"{len(small)} of {len(paths)} image(s) have a shorter side below --resolution "
                      f"{resolution} and will be upscaled (blurry); use larger photos or a lower "
                      f"--resolution: " + "; ".join(small), UserWarning, stacklevel=2)


def augmentations_are_deterministic(center_crop: bool, random_flip: bool) -> bool:
    """True when every epoch sees the same pixels, so VAE latents may be computed once.

    center_crop=False means RandomCrop (as in diffusers), random even when the crop
    happens to be a no-op for square images; we do not special-case that.
    """
    return center_crop and not random_flip
