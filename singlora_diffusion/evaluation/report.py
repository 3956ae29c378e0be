"""Phase 4: the report files and their pictures, from per-image scores (no model runs here).

Aggregation: a prompt's score is the mean of its images; a subject's, the mean of its images
(= of its prompts, which all have num_images images); the overall score of a method, the mean
over subjects (each subject weighs the same, as in the DreamBooth paper's table). The real-vs-
real row: per subject the mean over ordered pairs of distinct photos, then the mean over subjects.

Pictures are drawn with Pillow (no plotting dependency):
  grid()             one row per prompt: the subject's real photos, then each method's images.
  per_prompt_bars()  DINO | CLIP-I | CLIP-T panels, one group of bars per prompt, one bar per
                     method, the real-vs-real value as a dashed line. Axes show raw cosines.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..files import atomic_path, write_text
from .config import EvalConfig
from .generation import ADAPTER, BASE, IMAGES
from .metrics import mean
from .plan import Plan
from .protocol import Prompt, fill
from .scorer import RANDOM_STAMP, open_image
from .scoring import ImageScore, SubjectScores

METRICS = ("dino", "clip_i", "clip_t")
# Column titles by scorer: the toy scorer fills the same three fields with toy-world scores.
LABELS = {"dreambench": ("DINO", "CLIP-I", "CLIP-T"),
          "toy": ("toy subject similarity", "subject classified", "background as prompted")}
TOY_METRICS = {
    "dino": "mean cosine between the toy extractor's features of every generated and every real image",
    "clip_i": "fraction of (generated, real) pairs the toy extractor gives the same shape and colour "
              "(real photos are the subject: the fraction of generated images classified as the subject)",
    "clip_t": "fraction of images whose background the toy extractor classifies as the colour the prompt names",
    "real_vs_real": "the toy similarity over ordered pairs of distinct real images",
    "aggregation": "prompt = mean of its images; subject = mean of its images; overall = mean over subjects",
}
METHOD_TITLES = {BASE: "base model (no adapter)", ADAPTER: "adapter", IMAGES: "given images"}
PAPER_REAL = {"dino": 0.774, "clip_i": 0.885}  # DreamBooth, Table 1: real images
COLOURS = [(76, 114, 176), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179)]
_RED = (200, 0, 0)


def _means(images: list[ImageScore]) -> dict:
    return {k: mean(getattr(im, k) for im in images) for k in METRICS} | {"images": len(images)}


def _group(images: list[ImageScore], key) -> dict[str, list[ImageScore]]:
    groups: dict[str, list[ImageScore]] = {}
    for im in images:
        groups.setdefault(key(im), []).append(im)
    return groups


def _prompt_key(prompt: Prompt, several_subjects: bool) -> str:
    """Per-prompt rows: the prompt itself for one subject; its template across subjects."""
    if several_subjects and prompt.template is not None:
        return fill(prompt.template, "[V]", "[class]")
    return prompt.text


def methods_of(results: list[SubjectScores]) -> list[str]:
    order = list(METHOD_TITLES)
    found = {m for r in results for m in r.images}
    return sorted(found, key=order.index)


def _image_row(im: ImageScore) -> dict:
    g = im.image
    return {"subject": g.subject, "method": g.method, "prompt": g.prompt.text, "clip_t_text": im.clip_t_text,
            "seed": g.seed, "file": str(g.path), "dino": im.dino, "clip_i": im.clip_i, "clip_t": im.clip_t}


def _subject_entry(r: SubjectScores) -> dict:
    """One subject in scores.json: its photos, real vs real, each method overall and per prompt."""
    entry = {"class": r.subject.class_name, "photos": [str(p) for p in r.subject.photos],
             "adapter": str(r.subject.adapter) if r.subject.adapter else None,
             "real_vs_real": r.real_vs_real, "methods": {}}
    for method, images in r.images.items():
        prompts = {text: _means(group) | {"clip_t_text": group[0].clip_t_text}
                   for text, group in _group(images, lambda im: im.image.prompt.text).items()}
        entry["methods"][method] = _means(images) | {"prompts": prompts}
    return entry


def _overall(results: list[SubjectScores], subjects: dict, methods: list[str]) -> dict:
    """Each method's mean over subjects (each subject weighs the same), and real vs real."""
    overall = {"real_vs_real": {k: mean(r.real_vs_real[k] for r in results) for k in ("dino", "clip_i")}
               | {"subjects": sum(r.real_vs_real["dino"] is not None for r in results)},
               "methods": {}}
    for method in methods:
        per_subject = [subjects[r.subject.name]["methods"][method] for r in results if method in r.images]
        overall["methods"][method] = {k: mean(s[k] for s in per_subject) for k in METRICS} | {
            "subjects": len(per_subject), "images": sum(s["images"] for s in per_subject)}
    return overall


def _per_prompt(results: list[SubjectScores], methods: list[str]) -> dict[str, dict]:
    per_prompt: dict[str, dict] = {}
    for method in methods:
        everything = [im for r in results for im in r.images.get(method, [])]
        for key, group in _group(everything, lambda im: _prompt_key(im.image.prompt, len(results) > 1)).items():
            per_prompt.setdefault(key, {})[method] = _means(group) | {
                "subjects": len({im.image.subject for im in group})}
    return per_prompt


def _options(cfg: EvalConfig, plan: Plan) -> dict:
    """The settings a reader needs to compare two reports (generation ones only when generating)."""
    generating = cfg.generates
    return {
        "identifier": cfg.identifier, "clip_t_identifier": cfg.clip_t_identifier,
        "clip_t_text": (f"the prompt without the identifier token {cfg.identifier!r}"
                        if cfg.clip_t_identifier == "remove" else "the full prompt, identifier included"),
        "prompts": cfg.prompts, "num_images": cfg.num_images, "seeds": cfg.seeds if generating else None,
        "prompts_and_classes": str(plan.dreambench_file or "bundled copy of google/dreambooth's file"),
        "base": plan.base, "baseline": cfg.baseline, "steps": cfg.steps if generating else None,
        "guidance": cfg.guidance if generating else None, "negative_prompt": cfg.negative_prompt,
        "resolution": cfg.resolution, "scale": cfg.scale, "mixed_precision": cfg.mixed_precision,
        "images_dir": cfg.images_dir,
    }


def build_scores(results: list[SubjectScores], cfg: EvalConfig, scorer_info: dict, random_weights: bool,
                 plan: Plan) -> dict:
    """Everything in scores.json: settings, per image, per prompt, per subject, overall."""
    methods = methods_of(results)
    subjects = {r.subject.name: _subject_entry(r) for r in results}
    kind = scorer_info.get("kind", "dreambench")
    toy = {"stamp": scorer_info.get("stamp"), "protocol": "the toy world (toy:shapes): toy-world scores, not "
           "DreamBench's", "metrics": TOY_METRICS} if kind == "toy" else {}
    return {
        "stamp": RANDOM_STAMP if random_weights else None,
        "random_weights": random_weights,
        "scorer": kind,
        "labels": dict(zip(METRICS, LABELS[kind])),
        "protocol": "DreamBench (DreamBooth, Ruiz et al., arXiv 2208.12242, Sec. 4.1)",
        "scale": "raw cosine similarities in [-1, 1]; never rescaled",
        **toy,
        "metrics": toy.get("metrics") or {
            "dino": "mean cosine between DINO embeddings of every generated and every real image of the subject",
            "clip_i": "the same with CLIP image embeddings",
            "clip_t": "mean cosine between each generated image's CLIP embedding and its prompt's text embedding",
            "real_vs_real": "mean cosine over ordered pairs of distinct real images of a subject",
            "aggregation": "prompt = mean of its images; subject = mean of its images; overall = mean over subjects",
        },
        "models": scorer_info,
        "options": _options(cfg, plan),
        "config": dataclasses.asdict(cfg),
        "overall": _overall(results, subjects, methods),
        "prompts": _per_prompt(results, methods),
        "subjects": subjects,
        "images": [_image_row(im) for r in results for images in r.images.values() for im in images],
    }


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def _title(method: str) -> str:
    return METHOD_TITLES.get(method, method)


def _labels(scores: dict) -> str:
    return " | ".join(scores.get("labels", dict(zip(METRICS, LABELS["dreambench"]))).values())


def summary_table(scores: dict) -> str:
    """The paper-style table (markdown): real vs real, then each method."""
    o = scores["overall"]
    lines = [f"| | {_labels(scores)} | subjects | images |", "|---|---:|---:|---:|---:|---:|",
             f"| real images (real vs real) | {_fmt(o['real_vs_real']['dino'])} | {_fmt(o['real_vs_real']['clip_i'])} "
             f"| — | {o['real_vs_real']['subjects']} | — |"]
    for method, s in o["methods"].items():
        lines.append(f"| {_title(method)} | {_fmt(s['dino'])} | {_fmt(s['clip_i'])} | "
                     f"{_fmt(s['clip_t'])} | {s['subjects']} | {s['images']} |")
    return "\n".join(lines)


def _tables(scores: dict) -> list[str]:
    """report.md's per-subject and per-prompt tables."""
    first, second, _ = scores.get("labels", dict(zip(METRICS, LABELS["dreambench"]))).values()
    parts = [f"## Per subject\n\n| subject | class | method | {_labels(scores)} | images | real vs real {first} "
             f"| real vs real {second} |\n|---|---|---|---:|---:|---:|---:|---:|---:|\n"]
    for name, s in scores["subjects"].items():
        for method, m in s["methods"].items():
            parts.append(f"| {name} | {s['class'] or '—'} | {_title(method)} | {_fmt(m['dino'])} | "
                         f"{_fmt(m['clip_i'])} | {_fmt(m['clip_t'])} | {m['images']} | "
                         f"{_fmt(s['real_vs_real']['dino'])} | {_fmt(s['real_vs_real']['clip_i'])} |\n")
    parts.append(f"\n## Per prompt (mean over subjects)\n\n| prompt | method | {_labels(scores)} | images |\n"
                 "|---|---|---:|---:|---:|---:|\n")
    for prompt, by_method in scores["prompts"].items():
        for method, m in by_method.items():
            parts.append(f"| {prompt} | {_title(method)} | {_fmt(m['dino'])} | {_fmt(m['clip_i'])} "
                         f"| {_fmt(m['clip_t'])} | {m['images']} |\n")
    return parts


def report_markdown(scores: dict, figures: dict[str, str]) -> str:
    opt, models = scores["options"], scores["models"]
    toy = scores.get("scorer") == "toy"
    stamp = f"> **{scores['stamp']}**: the scoring models have random weights; use real weights for numbers.\n\n" \
        if scores["stamp"] and not toy else ""
    if toy:
        stamp = (f"> **{scores['stamp']}**: toy:shapes images scored by the toy world's own extractor; they show "
                 f"that training learns the toy subject and say nothing about real models.\n\n")
    parts = [f"# {'Toy-world' if toy else 'DreamBench'} evaluation\n\n{stamp}"
             f"Protocol: {scores['protocol']}. Scores are {scores['scale']}. "
             + ("Background as prompted compares each image's classified background with the colour its prompt "
                "names.\n\n" if toy else f"CLIP-T compares each image with {opt['clip_t_text']}.\n\n"),
             summary_table(scores), "\n\n",
             "" if toy else f"For reference, the DreamBooth paper reports real vs real = {PAPER_REAL['dino']} DINO "
                            f"and {PAPER_REAL['clip_i']} CLIP-I over its 30 subjects.\n\n", *_tables(scores)]
    parts.append("\n## Figures\n\n" + "".join(f"![{title}]({path})\n\n" for title, path in figures.items()))
    parts.append("## Settings\n\n")
    if toy:
        d = models["toy"]
        parts.append(f"- toy scorer: {d['model']}; embeddings: {d['embeddings']}; weights: {d['weights']}\n")
    for model in () if toy else ("dino", "clip"):
        d = models[model]
        parts.append(f"- {model.upper()}: {d['model']}, {d['embedding']}; weights: {d['weights']}; "
                     f"preprocessing: {d['preprocessing']}\n")
    for key in ("identifier", "clip_t_identifier", "prompts", "prompts_and_classes", "num_images", "seeds", "base",
                "baseline", "steps", "guidance", "negative_prompt", "resolution", "scale", "mixed_precision",
                "images_dir"):
        parts.append(f"- {key}: `{opt[key]}`\n")
    parts.append("\nFull settings and per-image scores: `scores.json`, `scores.csv`.\n")
    return "".join(parts)


def write_csv(path: Path, scores: dict) -> None:
    weights = scores["stamp"] or "real"
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["subject", "method", "prompt", "clip_t_text", "seed", "file", "dino", "clip_i", "clip_t",
                    "weights"])
        for im in scores["images"]:
            w.writerow([im["subject"], im["method"], im["prompt"], im["clip_t_text"], im["seed"], im["file"],
                        repr(im["dino"]), repr(im["clip_i"]), repr(im["clip_t"]), weights])


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")  # the temporary's name ends in .tmp: say the format


def _grid_rows(r: SubjectScores, first_only: bool = False) -> list[tuple[str, tuple, dict[str, list[Path]]]]:
    """grid() rows of one subject: every prompt, or (several subjects) only its first one, labelled."""
    texts = list(dict.fromkeys(im.image.prompt.text for ims in r.images.values() for im in ims))
    texts = texts[:1] if first_only else texts
    return [(f"{r.subject.name}: {t}" if first_only else t, r.subject.photos,
             {m: [im.image.path for im in ims if im.image.prompt.text == t] for m, ims in r.images.items()})
            for t in texts]


def write_report(out: Path, results: list[SubjectScores], scores: dict) -> dict[str, Path]:
    """scores.json, scores.csv, report.md, grid.png (+ grids/ for several subjects), per_prompt.png."""
    out = Path(out)
    files = {"scores.json": out / "scores.json", "scores.csv": out / "scores.csv", "report.md": out / "report.md",
             "grid.png": out / "grid.png", "per_prompt.png": out / "per_prompt.png"}
    stamp = scores["stamp"]
    write_text(files["scores.json"], json.dumps(scores, indent=2, ensure_ascii=False))
    write_csv(files["scores.csv"], scores)
    if len(results) == 1:
        _save_png(grid(_grid_rows(results[0]), stamp), files["grid.png"])
    else:
        # several subjects: grid.png shows each subject's first prompt; grids/<subject>.png every prompt
        (out / "grids").mkdir(exist_ok=True)
        for r in results:
            _save_png(grid(_grid_rows(r), stamp), out / "grids" / f"{r.subject.name}.png")
        _save_png(grid([row for r in results for row in _grid_rows(r, first_only=True)], stamp), files["grid.png"])
    keys = list(scores["prompts"])
    bars = {m: {k: scores["prompts"][k][m] for k in keys if m in scores["prompts"][k]}
            for m in scores["overall"]["methods"]}
    _save_png(per_prompt_bars(keys, bars, scores["overall"]["real_vs_real"], stamp, scores.get("labels")),
              files["per_prompt.png"])
    figures = {"grid": "grid.png", "per-prompt scores": "per_prompt.png"}
    write_text(files["report.md"], report_markdown(scores, figures))
    return files


# -- pictures --------------------------------------------------------------------------------

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


def _legend(draw: ImageDraw.ImageDraw, methods: list[str], x: int, y: int, font) -> None:
    """A colour swatch per method, then the dashed real-vs-real line's key."""
    for m, method in enumerate(methods):
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=COLOURS[m % len(COLOURS)])
        draw.text((x + 14, y), method, fill="black", font=font)
        x += 20 + int(font.getlength(method)) + 12
    draw.text((x, y), "- - real vs real", fill="black", font=font)


def per_prompt_bars(prompts: list[str], scores: dict[str, dict[str, dict[str, float]]],
                    reference: dict[str, float | None], stamp: str | None = None,
                    labels: dict[str, str] | None = None) -> Image.Image:
    """`scores[method][prompt]` = {"dino", "clip_i", "clip_t"}; `reference` = real vs real per metric."""
    labels = labels or dict(zip(METRICS, LABELS["dreambench"]))
    panels = [(labels[key], key) for key in METRICS]
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
    _legend(draw, methods, label_w, top - 36, font)
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
