"""Image files: which files in a folder are usable images, and loading one as RGB.

One rule for every folder the project reads (training photos, class images, the
evaluation's subject photos and generated images): every entry directly in the folder
that Pillow fully decodes is an image; the rest is skipped and named, with its reason,
in one warning.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import BadInput, NotFound

_WHITE = (255, 255, 255)


class ImageFolderError(BadInput):
    """An image folder is missing, empty or holds nothing usable."""


class MissingImageFolder(ImageFolderError, NotFound):
    """The image folder does not exist."""


def why_unusable(path: Path) -> str | None:
    """None if `path` is an image Pillow can fully decode, else a short reason."""
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
    except Exception as err:  # any decoder failure means this file cannot be used
        return f"corrupt or truncated, {type(err).__name__}: {err}"
    return None


def scan_images(folder, flag: str, what: str = "images", ignore: tuple[str, ...] = ()) -> list[Path]:
    """Sorted usable image files directly in `folder`; one UserWarning lists every entry skipped.

    flag names the folder in messages (--instance_data_dir); what says what belongs in it.
    ignore: file names that belong in the folder and are not images (a manifest).
    Raises ImageFolderError when the folder is missing, empty or has no readable image.
    Each image is decoded once here so that a bad file fails now, not hours into a run.
    """
    folder = Path(folder)
    if not folder.exists():
        raise MissingImageFolder(f"{flag} {folder}: no such folder; pass the folder that holds your {what}.")
    if not folder.is_dir():
        raise ImageFolderError(f"{flag} {folder}: is a file, not a folder; pass the folder that holds your {what}.")
    entries = [p for p in sorted(folder.iterdir()) if p.name not in ignore]
    if not entries:
        raise ImageFolderError(f"{flag} {folder}: folder is empty; put your {what} (.jpg, .png, ...) in it.")
    good, skipped = [], []
    for path in entries:
        reason = why_unusable(path)
        if reason is None:
            good.append(path)
        else:
            skipped.append(f"{path.name}: {reason}")
    if not good:
        raise ImageFolderError(f"{flag} {folder}: no readable image among {len(entries)} entries "
                               f"[{'; '.join(skipped) or 'only documentation files'}]; add JPEG or PNG images.")
    if skipped:
        warnings.warn(f"{flag} {folder}: skipped {len(skipped)} of {len(entries)} entries, using "
                      f"{len(good)} image(s): [" + "; ".join(skipped) + "]", UserWarning, stacklevel=2)
    return good


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips I;16/I values above 255 (almost everything is white);
    # scale instead: 0..65535 -> 0..255 exactly, as 65535 / 257 = 255.
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")


def _onto_white(image: Image.Image) -> Image.Image:
    # Transparent regions have arbitrary (often black) colour underneath; a photo of a
    # cut-out subject should be seen on a plain white background, not a black one.
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


def read_caption(path: str | Path, shown: str | None = None) -> str:
    """A caption file's text, whitespace runs as single spaces; BadInput naming it (`shown`, else its
    path) when it is not UTF-8 or is empty. The trainer and the web UI's upload share this rule."""
    path = Path(path)
    name = shown or str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a BOM from Windows editors is not part of the caption
    except UnicodeDecodeError as e:
        raise BadInput(f"caption {name} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    text = " ".join(text.split())
    if not text:
        raise BadInput(f"caption {name} is empty; write the image's caption in it, or delete the file to train "
                       f"that image on the instance prompt")
    return text
