"""Phase 4: the report files, from per-image scores (no model runs here).

Aggregation: a prompt's score is the mean of its images; a subject's, the mean of its images
(= of its prompts, which all have num_images images); the overall score of a method, the mean
over subjects (each subject weighs the same, as in the DreamBooth paper's table). The real-vs-
real row: per subject the mean over ordered pairs of distinct photos, then the mean over subjects.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

from .config import EvalConfig
from .metrics import mean
from .models import RANDOM_STAMP
from .plan import Plan
from .protocol import Prompt, fill
from .scoring import ImageScore, SubjectScores

METRICS = ("dino", "clip_i", "clip_t")
METHOD_TITLES = {"base": "base model (no adapter)", "adapter": "adapter", "images": "given images"}
PAPER_REAL = {"dino": 0.774, "clip_i": 0.885}  # DreamBooth, Table 1: real images


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


def build_scores(results: list[SubjectScores], cfg: EvalConfig, scorer_info: dict, random_weights: bool,
                 plan: Plan) -> dict:
    """Everything in scores.json: settings, per image, per prompt, per subject, overall."""
    methods = methods_of(results)
    subjects, images_out = {}, []
    for r in results:
        entry = {"class": r.subject.class_name, "photos": [str(p) for p in r.subject.photos],
                 "adapter": str(r.subject.adapter) if r.subject.adapter else None,
                 "real_vs_real": r.real_vs_real, "methods": {}}
        for method, images in r.images.items():
            prompts = {text: _means(group) | {"clip_t_text": group[0].clip_t_text}
                       for text, group in _group(images, lambda im: im.prompt.text).items()}
            entry["methods"][method] = _means(images) | {"prompts": prompts}
            images_out += [{"subject": im.subject, "method": im.method, "prompt": im.prompt.text,
                            "clip_t_text": im.clip_t_text, "seed": im.seed, "file": str(im.path),
                            "dino": im.dino, "clip_i": im.clip_i, "clip_t": im.clip_t} for im in images]
        subjects[r.subject.name] = entry
    overall = {"real_vs_real": {k: mean(r.real_vs_real[k] for r in results) for k in ("dino", "clip_i")}
               | {"subjects": sum(r.real_vs_real["dino"] is not None for r in results)},
               "methods": {}}
    for method in methods:
        per_subject = [subjects[r.subject.name]["methods"][method] for r in results if method in r.images]
        overall["methods"][method] = {k: mean(s[k] for s in per_subject) for k in METRICS} | {
            "subjects": len(per_subject), "images": sum(s["images"] for s in per_subject)}
    per_prompt: dict[str, dict] = {}
    for method in methods:
        everything = [im for r in results for im in r.images.get(method, [])]
        for key, group in _group(everything, lambda im: _prompt_key(im.prompt, len(results) > 1)).items():
            per_prompt.setdefault(key, {})[method] = _means(group) | {"subjects": len({im.subject for im in group})}
    remove = cfg.clip_t_identifier == "remove"
    return {
        "stamp": RANDOM_STAMP if random_weights else None,
        "random_weights": random_weights,
        "protocol": "DreamBench (DreamBooth, Ruiz et al., arXiv 2208.12242, Sec. 4.1)",
        "scale": "raw cosine similarities in [-1, 1]; never rescaled",
        "metrics": {
            "dino": "mean cosine between DINO embeddings of every generated and every real image of the subject",
            "clip_i": "the same with CLIP image embeddings",
            "clip_t": "mean cosine between each generated image's CLIP embedding and its prompt's text embedding",
            "real_vs_real": "mean cosine over ordered pairs of distinct real images of a subject",
            "aggregation": "prompt = mean of its images; subject = mean of its images; overall = mean over subjects",
        },
        "models": scorer_info,
        "options": {
            "identifier": cfg.identifier, "clip_t_identifier": cfg.clip_t_identifier,
            "clip_t_text": (f"the prompt without the identifier token {cfg.identifier!r}" if remove
                            else "the full prompt, identifier included"),
            "prompts": cfg.prompts, "num_images": cfg.num_images, "seeds": cfg.seeds if cfg.generates else None,
            "prompts_and_classes": str(plan.dreambench_file or "bundled copy of google/dreambooth's file"),
            "base": plan.base, "baseline": cfg.baseline, "steps": cfg.steps if cfg.generates else None,
            "guidance": cfg.guidance if cfg.generates else None, "negative_prompt": cfg.negative_prompt,
            "resolution": cfg.resolution, "scale": cfg.scale, "mixed_precision": cfg.mixed_precision,
            "images_dir": cfg.images_dir,
        },
        "config": dataclasses.asdict(cfg),
        "overall": overall,
        "prompts": per_prompt,
        "subjects": subjects,
        "images": images_out,
    }


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def summary_table(scores: dict) -> str:
    """The paper-style table (markdown): real vs real, then each method."""
    o = scores["overall"]
    lines = ["| | DINO | CLIP-I | CLIP-T | subjects | images |", "|---|---:|---:|---:|---:|---:|",
             f"| real images (real vs real) | {_fmt(o['real_vs_real']['dino'])} | {_fmt(o['real_vs_real']['clip_i'])} "
             f"| — | {o['real_vs_real']['subjects']} | — |"]
    for method, s in o["methods"].items():
        lines.append(f"| {METHOD_TITLES.get(method, method)} | {_fmt(s['dino'])} | {_fmt(s['clip_i'])} | "
                     f"{_fmt(s['clip_t'])} | {s['subjects']} | {s['images']} |")
    return "\n".join(lines)


def report_markdown(scores: dict, figures: dict[str, str]) -> str:
    opt, models = scores["options"], scores["models"]
    stamp = f"> **{scores['stamp']}**: the scoring models have random weights; use real weights for numbers.\n\n" \
        if scores["stamp"] else ""
    parts = [f"# DreamBench evaluation\n\n{stamp}"
             f"Protocol: {scores['protocol']}. Scores are {scores['scale']}. "
             f"CLIP-T compares each image with {opt['clip_t_text']}.\n\n",
             summary_table(scores), "\n\n",
             f"For reference, the DreamBooth paper reports real vs real = {PAPER_REAL['dino']} DINO and "
             f"{PAPER_REAL['clip_i']} CLIP-I over its 30 subjects.\n\n",
             "## Per subject\n\n| subject | class | method | DINO | CLIP-I | CLIP-T | images | real vs real DINO "
             "| real vs real CLIP-I |\n|---|---|---|---:|---:|---:|---:|---:|---:|\n"]
    for name, s in scores["subjects"].items():
        for method, m in s["methods"].items():
            parts.append(f"| {name} | {s['class'] or '—'} | {METHOD_TITLES.get(method, method)} | "
                         f"{_fmt(m['dino'])} | "
                         f"{_fmt(m['clip_i'])} | {_fmt(m['clip_t'])} | {m['images']} | "
                         f"{_fmt(s['real_vs_real']['dino'])} | {_fmt(s['real_vs_real']['clip_i'])} |\n")
    parts.append("\n## Per prompt (mean over subjects)\n\n| prompt | method | DINO | CLIP-I | CLIP-T | images |\n"
                 "|---|---|---:|---:|---:|---:|\n")
    for prompt, by_method in scores["prompts"].items():
        for method, m in by_method.items():
            parts.append(f"| {prompt} | {METHOD_TITLES.get(method, method)} | {_fmt(m['dino'])} | {_fmt(m['clip_i'])} "
                         f"| {_fmt(m['clip_t'])} | {m['images']} |\n")
    parts.append("\n## Figures\n\n" + "".join(f"![{title}]({path})\n\n" for title, path in figures.items()))
    parts.append("## Settings\n\n")
    for model in ("dino", "clip"):
        d = models[model]
        parts.append(f"- {model.upper()}: {d['model']}, {d['embedding']}; weights: {d['weights']}; "
                     f"preprocessing: {d['preprocessing']}\n")
    for key in ("identifier", "clip_t_identifier", "prompts", "prompts_and_classes", "num_images", "seeds", "base",
                "baseline", "steps", "guidance", "negative_prompt", "resolution", "scale", "mixed_precision",
                "images_dir"):
        parts.append(f"- {key}: `{opt[key]}`\n")
    parts.append("\nFull settings and per-image scores: `scores.json`, `scores.csv`.\n")
    return "".join(parts)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_csv(path: Path, scores: dict) -> None:
    weights = scores["stamp"] or "real"
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["subject", "method", "prompt", "clip_t_text", "seed", "file", "dino", "clip_i", "clip_t",
                    "weights"])
        for im in scores["images"]:
            w.writerow([im["subject"], im["method"], im["prompt"], im["clip_t_text"], im["seed"], im["file"],
                        repr(im["dino"]), repr(im["clip_i"]), repr(im["clip_t"]), weights])
    os.replace(tmp, path)


def write_report(out: Path, results: list[SubjectScores], scores: dict) -> dict[str, Path]:
    """scores.json, scores.csv, report.md, grid.png (+ grids/ for several subjects), per_prompt.png."""
    from .figures import grid, per_prompt_bars

    out = Path(out)
    files = {"scores.json": out / "scores.json", "scores.csv": out / "scores.csv", "report.md": out / "report.md",
             "grid.png": out / "grid.png", "per_prompt.png": out / "per_prompt.png"}
    stamp = scores["stamp"]
    _atomic_text(files["scores.json"], json.dumps(scores, indent=2, ensure_ascii=False))
    write_csv(files["scores.csv"], scores)

    def rows(r: SubjectScores, first_only: bool = False):
        texts = list(dict.fromkeys(im.prompt.text for ims in r.images.values() for im in ims))
        texts = texts[:1] if first_only else texts
        return [(f"{r.subject.name}: {t}" if first_only else t, r.subject.photos,
                 {m: [im.path for im in ims if im.prompt.text == t] for m, ims in r.images.items()}) for t in texts]

    if len(results) == 1:
        grid(rows(results[0]), stamp).save(files["grid.png"])
    else:
        # several subjects: grid.png shows each subject's first prompt; grids/<subject>.png every prompt
        (out / "grids").mkdir(exist_ok=True)
        for r in results:
            grid(rows(r), stamp).save(out / "grids" / f"{r.subject.name}.png")
        grid([row for r in results for row in rows(r, first_only=True)], stamp).save(files["grid.png"])
    keys = list(scores["prompts"])
    bars = {m: {k: scores["prompts"][k][m] for k in keys if m in scores["prompts"][k]}
            for m in scores["overall"]["methods"]}
    per_prompt_bars(keys, bars, scores["overall"]["real_vs_real"], stamp).save(files["per_prompt.png"])
    figures = {"grid": "grid.png", "per-prompt scores": "per_prompt.png"}
    _atomic_text(files["report.md"], report_markdown(scores, figures))
    return files
