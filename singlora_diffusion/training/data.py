"""The image side of DreamBooth: usable photos turned into training tensors.

Like diffusers' DreamBoothDataset (examples/dreambooth/train_dreambooth_lora.py), but a
folder straight from a phone or a download does not crash step 0 or train on garbage:

    folder --images.scan_images--> good paths --images.load_image--> RGB PIL --prepare_image--> (3, h, w) + Crop
             (one warning             (EXIF turned, CMYK,               (resize to cover (w, h), crop,
              for the rest)            16-bit, alpha handled)            maybe flip; in [-1, 1])

(w, h) is (resolution, resolution), or with --enable_bucket the bucket nearest the image's
aspect ratio (make_buckets / nearest_bucket, kohya's rules). Captions (read_caption) are
the text beside an image.

Finding and loading images is the core's (singlora_diffusion.images, one rule for every
folder the project reads); what is particular to training lives here.
"""
from __future__ import annotations

import math
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

    target_size: tuple[int, int]     # (height, width) trained on

    def time_ids(self) -> list[int]:
        return [*self.original_size, *self.top_left, *self.target_size]


Size = tuple[int, int]  # (width, height) in pixels, PIL's order


def prepare_image(image: Image.Image, size: int | Size, center_crop: bool, flip: bool) -> tuple[torch.Tensor, Crop]:
    """RGB image -> float tensor (3, h, w) in [-1, 1], and its Crop; `size` is (w, h) or one side of a square.

    Resized (bicubic, antialiased) so that it just covers (w, h), keeping its aspect ratio
    (small images are upscaled, see check_sizes), then a centre or a random crop of (w, h)
    (torch's RNG, which the trainer seeds per step), then a horizontal flip if `flip`.
    """
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    width, height = (size, size) if isinstance(size, int) else size
    if min(width, height) < 8:
        raise BadInput(f"resolution must be at least 8 pixels, got {width}x{height}")
    original = (image.height, image.width)
    # Resize on the PIL image: Pillow rounds and clamps to uint8, so bicubic overshoot
    # cannot push values outside [-1, 1] after normalisation. The side that is relatively
    # shorter goes to its target and the other follows (torchvision's int() rounding; for a
    # square this is resize(shorter side)).
    if image.width * height >= image.height * width:
        new = (height, max(width, int(height * image.width / image.height)))
    else:
        new = (max(height, int(width * image.height / image.width)), width)
    image = TF.resize(image, list(new), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    if center_crop:
        top, left = round((image.height - height) / 2), round((image.width - width) / 2)
    else:
        top, left, _, _ = v2.RandomCrop.get_params(image, (height, width))
    resized_width = image.width
    image = TF.crop(image, top, left, height, width)
    if flip:
        image = TF.horizontal_flip(image)
        left = resized_width - left - width  # the crop's position in the mirrored image
    pixels = TF.to_dtype(TF.to_image(image), torch.float32, scale=True) * 2 - 1
    return pixels, Crop(original, (top, left), (height, width))


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """kohya's bucket sizes (sd-scripts library/model_util.make_bucket_resolutions): the square of
    `resolution`, and for each width in min_reso..max_reso (multiples of `step`) the tallest height,
    a multiple of `step` in the same range, within resolution^2 pixels; both orientations."""
    area = resolution * resolution
    side = int(math.sqrt(area) // step) * step
    sizes = {(side, side)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, int((area // width) // step) * step)
        if height >= min_reso:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def nearest_bucket(image_size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio (w / h) is nearest the image's; kohya's choice."""
    ratio = image_size[0] / image_size[1]
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ratio), b))


def read_caption(image: Path, extension: str) -> str | None:
    """The caption beside `image` (photo.jpg -> photo.txt for ".txt"); None without one."""
    from ..images import read_caption as read_caption_file

    path = Path(image).with_suffix(extension)
    return read_caption_file(path) if path.is_file() else None


def upright_size(path: Path) -> Size:
    """(width, height) as the image will be trained on, from its header (EXIF rotation applied)."""
    with Image.open(path) as image:  # header only: no pixels decoded
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that turn by 90 degrees
            width, height = height, width
    return width, height


def check_sizes(paths, sizes: int | list[Size]) -> None:
    """One UserWarning naming every image smaller than the size it trains at (`sizes`: one square
    side for all, or each image's (w, h) bucket).

    Such images are upscaled by prepare_image and train the model on blur.
    """
    paths, small = [Path(p) for p in paths], []
    targets = [(sizes, sizes)] * len(paths) if isinstance(sizes, int) else sizes
    for path, (target_w, target_h) in zip(paths, targets):
        width, height = upright_size(path)
        if width < target_w or height < target_h:
            small.append(f"{path} upscaled from {width}x{height}"
                         + ("" if target_w == target_h else f" to its bucket {target_w}x{target_h}"))
    if small:
        warnings.warn(f"{len(small)} of {len(paths)} image(s) are smaller than the size they train at "
                      f"(--resolution {targets[0][0] if isinstance(sizes, int) else 'and its buckets'}) and "
                      f"will be upscaled (blurry); use larger photos or a lower --resolution: "
                      + "; ".join(small), UserWarning, stacklevel=2)


def augmentations_are_deterministic(center_crop: bool, random_flip: bool) -> bool:
    """True when every epoch sees the same pixels, so VAE latents may be computed once.

    center_crop=False means RandomCrop (as in diffusers), random even when the crop
    happens to be a no-op for square images; we do not special-case that.
    """
    return center_crop and not random_flip
