"""The image side of DreamBooth: usable photos turned into training tensors.

Like diffusers' DreamBoothDataset (examples/dreambooth/train_dreambooth_lora.py), but a
folder straight from a phone or a download does not crash step 0 or train on garbage:

    folder --images.scan_images--> good paths --images.load_image--> RGB PIL --prepare_image--> (3, r, r) + Crop
             (one warning             (EXIF turned, CMYK,               (resize short side, crop,
              for the rest)            16-bit, alpha handled)            maybe flip; in [-1, 1])

Finding and loading images is the core's (singlora_diffusion.images, one rule for every
folder the project reads); what is particular to training lives here.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import BadInput


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
