"""The image side of DreamBooth: find usable photos, load them as RGB, turn them into tensors.

Like diffusers' DreamBoothDataset (examples/dreambooth/train_dreambooth_lora.py), but a
folder straight from a phone or a download does not crash step 0 or train on garbage:

    folder --scan_images--> good paths --load_image--> RGB PIL --image_transform--> (3, r, r) in [-1, 1]
             (one warning     (EXIF turned, CMYK,       (resize short side, crop, maybe flip)
              for the rest)    16-bit, alpha handled)
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

_ROLES = ("instance", "class")
_WHITE = (255, 255, 255)


class ImageFolderError(ValueError):
    """A training image folder is missing, empty or holds nothing we can train on."""


def _flag(role: str) -> str:
    if role not in _ROLES:
        raise ValueError(f"role must be one of {_ROLES}, got {role!r}")
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


def image_transform(resolution: int, center_crop: bool, random_flip: bool):
    """A callable RGB PIL image -> float tensor (3, resolution, resolution) in [-1, 1].

    Shorter side to `resolution` (bicubic, antialiased; small images are upscaled, see
    check_sizes), then a centre or random square crop, then a horizontal flip with p=0.5.
    """
    from torchvision.transforms import v2

    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
    steps = [
        # Resize on the PIL image: Pillow rounds and clamps to uint8, so bicubic overshoot
        # cannot push values outside [-1, 1] after normalisation.
        v2.Resize(resolution, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(resolution) if center_crop else v2.RandomCrop(resolution),
    ]
    if random_flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    return v2.Compose(steps)


def _upright_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:  # header only: no pixels decoded
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that turn by 90 degrees
            width, height = height, width
    return width, height


def check_sizes(paths, resolution: int) -> None:
    """One UserWarning naming every image whose shorter side is below `resolution`.

    Such images are upscaled by image_transform and train the model on blur.
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


class DreamBoothDataset(Dataset):
    """Instance images (the subject) and, for prior preservation, class images.

    With class images the length is max(n_instance, n_class) as in diffusers: the
    shorter list is cycled. Images are decoded on every access; the trainer caches
    latents itself when augmentations_are_deterministic() allows it.
    """

    def __init__(self, instance_paths, instance_prompt: str, transform, class_paths=None,
                 class_prompt: str | None = None):
        self.instance_paths = [Path(p) for p in instance_paths]
        if not self.instance_paths:
            raise ValueError("DreamBoothDataset needs at least one instance image; "
                             "get the list from scan_images(--instance_data_dir).")
        self.class_paths = None if class_paths is None else [Path(p) for p in class_paths]
        if self.class_paths is not None and not self.class_paths:
            raise ValueError("class_paths is empty; pass None to train without prior preservation "
                             "or generate class images first.")
        if self.class_paths is not None and class_prompt is None:
            raise ValueError("class_paths given without class_prompt; pass --class_prompt "
                             "(e.g. 'a photo of a dog').")
        self.instance_prompt, self.class_prompt, self.transform = instance_prompt, class_prompt, transform

    def __len__(self) -> int:
        return max(len(self.instance_paths), len(self.class_paths or ()))

    def __getitem__(self, i: int) -> dict:
        n = len(self.instance_paths)
        example = {"instance_pixels": self.transform(load_image(self.instance_paths[i % n])),
                   "instance_prompt": self.instance_prompt, "instance_index": i % n}
        if self.class_paths is not None:
            j = i % len(self.class_paths)
            example.update(class_pixels=self.transform(load_image(self.class_paths[j])),
                           class_prompt=self.class_prompt, class_index=j)
        return example


def collate(examples: list[dict]) -> dict:
    """Batch DreamBoothDataset examples: pixels stacked, prompts as lists, indices as a LongTensor.

    Instance and class halves stay apart; the trainer decides whether to concatenate them.
    """
    batch = {}
    for role in ("instance", "class") if "class_pixels" in examples[0] else ("instance",):
        batch[f"{role}_pixels"] = torch.stack([e[f"{role}_pixels"] for e in examples]).contiguous()
        batch[f"{role}_prompt"] = [e[f"{role}_prompt"] for e in examples]
        batch[f"{role}_index"] = torch.tensor([e[f"{role}_index"] for e in examples], dtype=torch.long)
    return batch
