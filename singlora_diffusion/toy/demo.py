"""`python -m singlora_diffusion.toy demo OUTPUT_DIR`: what `make demo` shows after training.

The toy evaluation (eval/evaluate.py --scorer toy) of the trained adapter against the toy
base on the same prompts and seeds, then:
  before_after.png   one column per prompt (the subject on each known background), the
                     base's images above the adapter's, one row per seed, the same seeds;
  demo_scores.json   {"base": {"subject": s, "prompt": p}, "adapter": {...}}: the fraction of
                     images classified as the subject, and of images whose background is the
                     prompted one (toy-world scores, not DreamBench's);
and a three-line table on the terminal.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import world

DEMO_EVAL = dict(num_images=4, seed=0, **world.SAMPLING)  # what the targets in docs/science.md use


def evaluate_adapter(adapter: str | Path, out: str | Path, **overrides) -> dict:
    """The toy evaluation of `adapter` and of its base (scores.json's content)."""
    from ..evaluation.config import EvalConfig
    from ..evaluation.run import evaluate

    settings = dict(DEMO_EVAL, **overrides)
    cfg = EvalConfig(out=str(out), scorer="toy", subject_dir=world.SUBJECT_DATA, subject_name="toy_subject",
                     adapter=str(adapter), baseline=True, **settings)
    files = evaluate(cfg)
    return json.loads(Path(files["scores.json"]).read_text())


def demo_scores(scores: dict) -> dict:
    """{"base": {"subject", "prompt", "similarity"}, "adapter": {...}} from a toy scores.json."""
    methods = scores["overall"]["methods"]
    return {m: {"subject": methods[m]["clip_i"], "prompt": methods[m]["clip_t"], "similarity": methods[m]["dino"]}
            for m in ("base", "adapter") if m in methods}


def table(demo: dict) -> str:
    lines = ["| toy:shapes | subject classified | background as prompted | subject similarity |",
             "|---|---:|---:|---:|"]
    for method, title in (("base", "base"), ("adapter", "base + adapter")):
        s = demo[method]
        lines.append(f"| {title} | {s['subject']:.2f} | {s['prompt']:.2f} | {s['similarity']:.3f} |")
    return "\n".join(lines)


def before_after(scores: dict, path: Path, side: int = 64) -> Path:
    """One column per prompt; the base's images above the adapter's, one row per seed (the
    same seeds in both halves); upscaled without smoothing, so pixels stay pixels."""
    from PIL import Image, ImageDraw

    files = {(im["method"], im["prompt"], im["seed"]): im["file"] for im in scores["images"]}
    prompts = list(dict.fromkeys(p for _, p, _ in files))
    seeds = sorted({s for _, _, s in files})
    label_w, head, gap = 78, 22, 8
    half = side * len(seeds)
    canvas = Image.new("RGB", (label_w + side * len(prompts), head + 2 * half + gap), "white")
    pen = ImageDraw.Draw(canvas)
    for c, prompt in enumerate(prompts):
        pen.text((label_w + c * side + 4, 6), world.named_background(prompt) or prompt[:10], fill="black")
        for h, method in enumerate(("base", "adapter")):
            for r, seed in enumerate(seeds):
                image = Image.open(files[(method, prompt, seed)]).convert("RGB")
                canvas.paste(image.resize((side, side), Image.Resampling.NEAREST),
                             (label_w + c * side, head + h * (half + gap) + r * side))
    for h, title in enumerate(("base", "+ adapter")):
        pen.text((4, head + h * (half + gap) + half // 2 - 6), title, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def run(output_dir: str | Path) -> dict:
    """Evaluate the demo's adapter in output_dir, write the picture and demo_scores.json, print the table."""
    from ..files import write_json

    output_dir = Path(output_dir)
    scores = evaluate_adapter(output_dir, output_dir / "eval")
    demo = demo_scores(scores)
    write_json(output_dir / "demo_scores.json", demo)
    picture = before_after(scores, output_dir / "before_after.png")
    print(f"\n{scores['stamp']}\nprompts: {', '.join(dict.fromkeys(im['prompt'] for im in scores['images']))}\n")
    print(table(demo))
    print(f"\npicture: {picture}\nscores: {output_dir / 'demo_scores.json'} (full report: {output_dir / 'eval'})")
    return demo
