"""Image preprocessing of the protocol, one decode feeding both models.

DINO (DreamBooth Sec. 4.1, as in DINO's own evaluation): shorter side to 256 with bicubic
interpolation, centre crop 224, ImageNet mean/std. timm's pretrained config for
`vit_small_patch16_224.dino` says crop_pct 0.9 (resize to 249); the protocol's 256 -> 224
(crop_pct 0.875) is used instead, so it is written out here rather than resolved from timm.
CLIP: the model's own transform from open_clip (resize 224 bicubic, centre crop 224, OpenAI
mean/std), taken from open_clip unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

DINO_RESIZE, DINO_CROP = 256, 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_transform():
    from torchvision import transforms as T

    # Resize on the PIL image (antialiased bicubic, rounded to uint8), as torchvision's
    # ImageNet evaluation and DINO's eval_linear.py do.
    return T.Compose([
        T.Resize(DINO_RESIZE, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(DINO_CROP),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def dino_preprocessing_description() -> str:
    return (f"resize shorter side {DINO_RESIZE} (bicubic, antialiased), center crop {DINO_CROP}, "
            f"ImageNet mean {IMAGENET_MEAN} std {IMAGENET_STD}")


def open_image(source: str | Path | Image.Image) -> Image.Image:
    """Upright 8-bit RGB (EXIF rotation applied; CMYK, 16-bit, alpha handled as for training)."""
    from ..training.data import load_image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    return load_image(source)


def prepare(source, dino_tf, clip_tf) -> tuple[torch.Tensor, torch.Tensor]:
    """One image decoded once -> (DINO input (3, 224, 224), CLIP input (3, 224, 224))."""
    image = open_image(source)
    return dino_tf(image), clip_tf(image)
