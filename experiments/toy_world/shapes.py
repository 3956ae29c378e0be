"""The toy world's data: coloured shapes drawn procedurally, with captions.

Why shapes rather than scikit-learn's digits: every image has three named,
independent attributes (shape, colour, background), so a caption really
conditions the image, a "class prompt" has an obvious meaning ("a red circle
on a blue background"), and a held-out subject (a shape and colour never
drawn in pretraining) is easy to make. It needs no extra package and gives
unlimited fresh images for held-out losses. Digits are greyscale, 8x8 and
1,797 images: too few to pretrain on and too few attributes to caption.
"""
from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32                     # pixels of a toy-world image
SHAPES = ("circle", "square", "triangle", "diamond")          # seen in pretraining
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220),
           "yellow": (240, 220, 40), "white": (245, 245, 245), "black": (20, 20, 20)}
# The subject: a shape and a colour pretraining never drew, bound to "sks".
SUBJECT = {"shape": "star", "colour": (255, 130, 0)}
INSTANCE_PROMPT = "a sks shape"
ALL_SHAPES = SHAPES + (SUBJECT["shape"],)


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(math.pi / 4 + k * math.pi / 2) for k in range(4)]
        return [(cx + r * math.cos(a + turn), cy + r * math.sin(a + turn)) for a in corners]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(-math.pi / 2 + k * 2 * math.pi / 3), cy + r * math.sin(-math.pi / 2 + k * 2 * math.pi / 3))
                for k in range(3)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5 + turn
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def draw(shape: str, colour, background, rng: random.Random, size: int = SIZE) -> Image.Image:
    """One shape at a random position and size; drawn 4x larger then downsampled (anti-aliasing)."""
    big = size * 4
    image = Image.new("RGB", (big, big), tuple(background))
    pen = ImageDraw.Draw(image)
    r = big * rng.uniform(0.22, 0.34)
    cx, cy = (big / 2 + rng.uniform(-0.12, 0.12) * big for _ in range(2))
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(colour))
    else:
        pen.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.2, 0.2)), fill=tuple(colour))
    return image.resize((size, size), Image.Resampling.BOX)


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def class_sample(rng: random.Random) -> tuple[Image.Image, str, tuple[int, int, int]]:
    """A pretraining image, its caption, and its labels (shape, colour, background) as indices."""
    shape = rng.choice(SHAPES)
    colour, background = rng.sample(list(COLOURS), 2)
    names = list(COLOURS)
    image = draw(shape, COLOURS[colour], COLOURS[background], rng)
    return image, caption(shape, colour, background), (ALL_SHAPES.index(shape), names.index(colour), names.index(background))


def subject_sample(rng: random.Random) -> tuple[Image.Image, tuple[int, int, int]]:
    """The subject on a random known background, and its labels (colour index len(COLOURS) = orange)."""
    background = rng.choice([c for c in COLOURS if c != "yellow"])  # yellow would hide the orange star
    image = draw(SUBJECT["shape"], SUBJECT["colour"], COLOURS[background], rng)
    return image, (ALL_SHAPES.index(SUBJECT["shape"]), len(COLOURS), list(COLOURS).index(background))


def to_array(images: list[Image.Image]) -> np.ndarray:
    """uint8 (N, 3, H, W)."""
    return np.stack([np.asarray(im, dtype=np.uint8).transpose(2, 0, 1) for im in images])
