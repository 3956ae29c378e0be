"""The report's pictures, drawn with Pillow (no plotting dependency).

grid():          one row per prompt: the subject's real photos, then each method's images.
per_prompt_bars(): DINO | CLIP-I | CLIP-T panels, one group of bars per prompt, one bar per
                 method, the real-vs-real value as a dashed line. Axes show raw cosines.
"""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

from .preprocess import open_image

COLOURS = [(76, 114, 176), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179)]
_RED = (200, 0, 0)


def _font(size: int = 12):
    return ImageFont.load_default(size=size)


def _thumb(source, side: int) -> Image.Image:
    image = open_image(source)
    scale = side / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    tile = Image.new("RGB", (side, side), "white")
    tile.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return tile


def _stamp(draw: ImageDraw.ImageDraw, stamp: str | None, y: int = 4) -> None:
    if stamp:  # Pillow's built-in font has no em dash
        draw.text((8, y), stamp.replace("—", "-"), fill=_RED, font=_font(16))


def grid(rows: list[tuple[str, list, dict[str, list]]], stamp: str | None = None, side: int = 96,
         max_photos: int = 6) -> Image.Image:
    """`rows`: [(label, real photos, {method: [image paths]})]; the real photos come first in each row."""
    methods = list(dict.fromkeys(m for _, _, images in rows for m in images))
    n_photos = max((min(len(photos), max_photos) for _, photos, _ in rows), default=0)
    per_method = max((len(v) for _, _, images in rows for v in images.values()), default=0)
    gap, label_h, top = 12, 18, 28 if stamp else 4
    columns = [("real photos", n_photos)] + [(m, per_method) for m in methods]
    width = sum(side * count + gap for _, count in columns)
    canvas = Image.new("RGB", (max(width, 400), top + label_h + len(rows) * (label_h + side)), "white")
    draw = ImageDraw.Draw(canvas)
    _stamp(draw, stamp)
    x = 0
    for title, count in columns:
        draw.text((x + 2, top), title, fill="black", font=_font())
        x += side * count + gap
    thumbs: dict = {}
    for r, (label, photos, images) in enumerate(rows):
        y = top + label_h + r * (label_h + side)
        draw.text((2, y + 2), label, fill="black", font=_font())
        y += label_h
        for i, photo in enumerate(list(photos)[:max_photos]):
            if photo not in thumbs:  # the same photos repeat on every row of a subject
                thumbs[photo] = _thumb(photo, side)
            canvas.paste(thumbs[photo], (i * side, y))
        x = side * n_photos + gap
        for method in methods:
            for i, path in enumerate(images.get(method, [])):
                canvas.paste(_thumb(path, side), (x + i * side, y))
            x += side * per_method + gap
    return canvas


def _axis(values) -> tuple[float, float]:
    """Raw cosine axis: from min(0, smallest) to the largest value, rounded out to 0.1."""
    lo = min([0.0] + [v for v in values if v is not None])
    hi = max([0.1] + [v for v in values if v is not None])
    return math.floor(lo * 10) / 10, math.ceil(hi * 10) / 10


def per_prompt_bars(prompts: list[str], scores: dict[str, dict[str, dict[str, float]]],
                    reference: dict[str, float | None], stamp: str | None = None) -> Image.Image:
    """`scores[method][prompt]` = {"dino", "clip_i", "clip_t"}; `reference` = real vs real per metric."""
    panels = [("DINO", "dino"), ("CLIP-I", "clip_i"), ("CLIP-T", "clip_t")]
    methods = list(scores)
    font = _font()
    label_w = min(360, 8 + max((int(font.getlength(p)) for p in prompts), default=0))
    bar_h, group_gap, panel_w, panel_gap = 7, 6, 220, 40
    top = (28 if stamp else 4) + 40
    group_h = bar_h * max(1, len(methods)) + group_gap
    height = top + group_h * len(prompts) + 30
    width = label_w + len(panels) * (panel_w + panel_gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    _stamp(draw, stamp)
    # legend
    x = label_w
    for m, method in enumerate(methods):
        draw.rectangle([x, top - 34, x + 10, top - 24], fill=COLOURS[m % len(COLOURS)])
        draw.text((x + 14, top - 36), method, fill="black", font=font)
        x += 20 + int(font.getlength(method)) + 12
    draw.text((x, top - 36), "- - real vs real", fill="black", font=font)
    for i, prompt in enumerate(prompts):
        draw.text((2, top + i * group_h), prompt if font.getlength(prompt) < label_w else prompt[:48] + "…",
                  fill="black", font=font)
    for p, (title, key) in enumerate(panels):
        x0 = label_w + p * (panel_w + panel_gap)
        values = [scores[m].get(q, {}).get(key) for m in methods for q in prompts] + [reference.get(key)]
        lo, hi = _axis(values)
        to_x = lambda v: x0 + (v - lo) / (hi - lo) * panel_w
        draw.text((x0, top - 20), title, fill="black", font=font)
        bottom = top + group_h * len(prompts)
        draw.line([to_x(0), top, to_x(0), bottom], fill="black")
        for tick in range(round(lo * 10), round(hi * 10) + 1, 2 if hi - lo > 0.5 else 1):
            t = tick / 10
            draw.line([to_x(t), bottom, to_x(t), bottom + 4], fill="black")
            draw.text((to_x(t) - 8, bottom + 6), f"{t:.1f}", fill="black", font=font)
        for i, prompt in enumerate(prompts):
            for m, method in enumerate(methods):
                v = scores[method].get(prompt, {}).get(key)
                if v is None:
                    continue
                y = top + i * group_h + m * bar_h
                draw.rectangle([min(to_x(0), to_x(v)), y, max(to_x(0), to_x(v)), y + bar_h - 2],
                               fill=COLOURS[m % len(COLOURS)])
        if reference.get(key) is not None:
            rx = to_x(reference[key])
            for y in range(top, bottom, 8):
                draw.line([rx, y, rx, y + 4], fill=_RED)
    return canvas
