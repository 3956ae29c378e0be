"""The toy world: coloured shapes drawn procedurally, with captions.

Why shapes: every image has three named, independent attributes (shape, colour,
background), so a caption really conditions the image, a class prompt has an
obvious meaning, and a subject the base model has never drawn (a new shape in a
new colour) is easy to make. Fresh images are unlimited and no package is needed.

Pretraining (toy.pretrain) shows the denoiser only the known shapes and colours; the
subject, a magenta cross bound to "sks", is what DreamBooth has to teach it.
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
# The subject: a shape and a colour pretraining never drew, bound to "sks" ("a sks shape").
SUBJECT_SHAPE, SUBJECT_COLOUR_NAME, SUBJECT_COLOUR = "cross", "magenta", (200, 40, 190)
ALL_SHAPES = SHAPES + (SUBJECT_SHAPE,)
ALL_COLOURS = tuple(COLOURS) + (SUBJECT_COLOUR_NAME,)          # what the extractor names
IDENTIFIER, CLASS_WORD = "sks", "shape"
INSTANCE_PROMPT = f"a {IDENTIFIER} {CLASS_WORD}"
# How toy-base images are rendered wherever they are scored or shown (the demo, the web UI,
# the experiments): 20 DDIM steps at guidance 4 give crisp shapes at 32 px.
SAMPLING = {"steps": 20, "guidance": 4.0}


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    def rotate(points):
        c, s = math.cos(turn), math.sin(turn)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape == "square":
        return rotate([(r * math.cos(math.pi / 4 + k * math.pi / 2), r * math.sin(math.pi / 4 + k * math.pi / 2))
                       for k in range(4)])
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(-math.pi / 2 + k * 2 * math.pi / 3), cy + r * math.sin(-math.pi / 2 + k * 2 * math.pi / 3))
                for k in range(3)]
    if shape == "cross":  # a plus sign whose arms are 0.36 r thick
        a, w = r, 0.36 * r
        return rotate([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w),
                       (-a, -w), (-w, -w)])
    raise ValueError(f"unknown shape {shape!r}")


def draw(shape: str, colour, background, rng: random.Random, size: int = SIZE) -> Image.Image:
    """One shape at a random position and size; drawn 4x larger then downsampled (anti-aliasing)."""
    big = size * 4
    image = Image.new("RGB", (big, big), tuple(background))
    pen = ImageDraw.Draw(image)
    r = big * rng.uniform(0.24, 0.36)
    cx, cy = (big / 2 + rng.uniform(-0.1, 0.1) * big for _ in range(2))
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(colour))
    else:
        pen.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.2, 0.2)), fill=tuple(colour))
    return image.resize((size, size), Image.Resampling.BOX)


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def subject_caption(background: str) -> str:
    return f"{INSTANCE_PROMPT} on a {background} background"


def named_background(prompt: str) -> str | None:
    """The background colour a prompt names ("... on a blue background"), None if it names none."""
    words = prompt.lower().replace(",", " ").split()
    for i in range(1, len(words)):
        if words[i] == "background" and words[i - 1] in COLOURS:
            return words[i - 1]
    return None


def class_sample(rng: random.Random) -> tuple[Image.Image, str, tuple[int, int, int]]:
    """A pretraining image, its caption, and its labels (shape, colour, background) as indices."""
    shape = rng.choice(SHAPES)
    colour, background = rng.sample(list(COLOURS), 2)
    image = draw(shape, COLOURS[colour], COLOURS[background], rng)
    return image, caption(shape, colour, background), (ALL_SHAPES.index(shape), ALL_COLOURS.index(colour),
                                                       ALL_COLOURS.index(background))


def subject_sample(rng: random.Random, background: str | None = None, shape: str = SUBJECT_SHAPE,
                   colour: str = SUBJECT_COLOUR_NAME) -> tuple[Image.Image, str, tuple[int, int, int]]:
    """A subject (by default the magenta cross) on a known background (random unless given), its
    caption and labels."""
    background = background or rng.choice(list(COLOURS))
    rgb = SUBJECT_COLOUR if colour == SUBJECT_COLOUR_NAME else COLOURS[colour]
    image = draw(shape, rgb, COLOURS[background], rng)
    return image, subject_caption(background), (ALL_SHAPES.index(shape), ALL_COLOURS.index(colour),
                                                ALL_COLOURS.index(background))


def any_sample(rng: random.Random) -> Image.Image:
    """Any shape in any colour (the subject's included, and random RGB ones): what the VAE learns
    to reconstruct, as SD's VAE has seen every kind of image."""
    shape = rng.choice(ALL_SHAPES)
    palette = list(COLOURS.values()) + [SUBJECT_COLOUR]
    pick = lambda: rng.choice(palette) if rng.random() < 0.7 else tuple(rng.randrange(256) for _ in range(3))
    return draw(shape, pick(), pick(), rng)


def to_array(images: list[Image.Image]) -> np.ndarray:
    """uint8 (N, 3, H, W)."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1) for im in images])


# The bundled subject (assets/toy_subject, bundled:toy_subject): five renderings on five of
# the six known backgrounds, white left out so prompts can ask for a background never shown.
SUBJECT_DATA = "bundled:toy_subject"  # its --instance_data_dir / --subject_dir
SUBJECT_BACKGROUNDS = ("red", "green", "blue", "yellow", "black")
SUBJECT_SEED = 2024
# More subjects for the grid's CPU rehearsal (assets/toy_subjects/, configs/grids/grid_toy.yaml):
# one specific known shape in a known colour bound to "sks", as a DreamBench subject is one
# specific dog of a class the base knows (the extractor knows only the cross in magenta, so a
# magenta circle would score as the cross). Their backgrounds: the five not of their own colour.
GRID_SUBJECTS = {"blue_circle": ("circle", "blue", 2025), "red_square": ("square", "red", 2026),
                 "green_triangle": ("triangle", "green", 2027)}


def write_subject(folder, shape: str = SUBJECT_SHAPE, colour: str = SUBJECT_COLOUR_NAME,
                  seed: int = SUBJECT_SEED) -> list:
    """A subject's images and caption files ("a sks shape on a red background"); by default the
    bundled one, the magenta cross; `python -m singlora_diffusion.toy subjects` writes the others."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = []
    backgrounds = SUBJECT_BACKGROUNDS if colour == SUBJECT_COLOUR_NAME else [c for c in COLOURS if c != colour]
    for i, background in enumerate(backgrounds):
        image, text, _ = subject_sample(rng, background, shape, colour)
        image.save(folder / f"sks-{i}.png")
        (folder / f"sks-{i}.txt").write_text(text + "\n")
        written.append(folder / f"sks-{i}.png")
    return written
