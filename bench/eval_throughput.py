"""How fast does the evaluation score images? Next to the raw forward throughput of its two models.

    .venv/bin/python -m bench.eval_throughput            # full run, ~2 min on 2 CPU cores
    .venv/bin/python -m bench.eval_throughput --quick    # a few images, keeps the script working

Scoring models: DINO ViT-S/16 and CLIP ViT-B/32 with random weights (the speed does not
depend on the values), float32, on CUDA if present, else the CPU. Images: the bundled dog3
photos resized to 512x512 and saved as PNG (what a Stable Diffusion 1.5 run writes),
repeated to --images files.

  raw forward       the two models on the same images, preprocessed beforehand (untimed) and
                    already on the device: the ceiling
  embed_images      Scorer.embed_images on the files: decode, both preprocessings, forward
  embed_subject     the evaluation's scoring phase on a fresh cache: + hashing each file
                    for the cache key, the subject's real photos, writing the cache

Each round times every measure once, in rotating order; images/s is per measure the median
over rounds and the ratio is per round against the raw forward of that round, median
[min, max]. Besides wall-clock time, the CPU time of this process (all its threads) is
measured: images per CPU-second says what the work costs even when other jobs share the
machine and slow the wall clock down. Goal: embed_subject >= 0.90x raw forward (decode,
preprocessing and bookkeeping cost <= 10 %).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

GOAL = 0.90
SETTINGS = {"full": dict(images=64, batch=32, rounds=5), "quick": dict(images=4, batch=2, rounds=1)}


def make_images(folder: Path, count: int, side: int = 512) -> list[Path]:
    from PIL import Image

    from singlora_diffusion.bundled import bundled_subject

    photos = sorted(bundled_subject().glob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        with Image.open(photos[i % len(photos)]) as photo:
            image = photo.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        path = folder / f"image {i}_{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) since `start`."""
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_forward(scorer, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds for the batches `inputs` (already preprocessed, on the device) through both models."""
    sync(scorer.device)
    start = clock()
    for dino_in, clip_in in inputs:
        scorer._forward(dino_in, clip_in)
    sync(scorer.device)
    return since(start)


def preprocessed(scorer, paths, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The very tensors embed_images would feed the models, made once, untimed."""
    from singlora_diffusion.evaluation.preprocess import prepare

    pairs = [prepare(p, scorer.dino_preprocess, scorer.clip_preprocess) for p in paths]
    return [(torch.stack([d for d, _ in pairs[i:i + batch]]).to(scorer.device),
             torch.stack([c for _, c in pairs[i:i + batch]]).to(scorer.device)) for i in range(0, len(pairs), batch)]


def embed_images(scorer, paths, batch: int) -> float:
    start = clock()
    scorer.embed_images(paths, batch)
    sync(scorer.device)
    return since(start)


def embed_subject(scorer, paths, photos, batch: int, scratch: Path) -> float:
    """The evaluation's own scoring phase for one subject, from an empty cache."""
    from singlora_diffusion.evaluation.config import EvalConfig
    from singlora_diffusion.evaluation.images import GeneratedImage
    from singlora_diffusion.evaluation.plan import Subject
    from singlora_diffusion.evaluation.protocol import Prompt
    from singlora_diffusion.evaluation.scoring import embed_subject as run

    shutil.rmtree(scratch, ignore_errors=True)
    cfg = EvalConfig(out=str(scratch), subject_dir="unused", score_batch_size=batch)
    images = [GeneratedImage(p, Prompt(p.stem.rpartition("_")[0]), 0) for p in paths]
    start = clock()
    run(scorer, Subject("bench", "dog", tuple(photos)), {"adapter": images}, cfg)
    sync(scorer.device)
    return since(start)


def main(argv: list[str] | None = None) -> None:
    from singlora_diffusion.bundled import bundled_subject
    from singlora_diffusion.evaluation.embed import load_scorer
    from singlora_diffusion.evaluation.models import Weights

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 images, batch 2, 1 round: seconds")
    ap.add_argument("--images", type=int, help="image files scored per measure (default 64; quick: 4)")
    ap.add_argument("--batch", type=int, help="images per forward (default 32; quick: 2)")
    ap.add_argument("--rounds", type=int, help="rounds (default 5; quick: 1)")
    ap.add_argument("--json", metavar="PATH", help="also write settings and per-round times here")
    args = ap.parse_args(argv)
    s = dict(SETTINGS["quick" if args.quick else "full"])
    s.update({k: v for k, v in (("images", args.images), ("batch", args.batch), ("rounds", args.rounds)) if v})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = load_scorer(Weights("dino", "random"), Weights("clip", "random"), device, True)
    photos = sorted(bundled_subject().glob("*.jpg"))
    work = Path(tempfile.mkdtemp(prefix="eval_throughput_"))
    try:
        paths = make_images(work / "images", s["images"])
        # warm-up: first calls allocate, pick kernels and fill the page cache
        inputs = preprocessed(scorer, paths, s["batch"])
        raw_forward(scorer, inputs[:1])
        embed_images(scorer, paths[: s["batch"]], s["batch"])
        measures = {
            "raw forward": lambda: raw_forward(scorer, inputs),
            "embed_images": lambda: embed_images(scorer, paths, s["batch"]),
            # the 6 real photos are embedded too: counted as images scored
            "embed_subject": lambda: embed_subject(scorer, paths, photos, s["batch"], work / "cache"),
        }
        counts = {"raw forward": s["images"], "embed_images": s["images"], "embed_subject": s["images"] + len(photos)}
        times: dict[str, list[float]] = {name: [] for name in measures}
        names = list(measures)
        for r in range(s["rounds"]):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotating order
                times[name].append(measures[name]())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rate = {n: [counts[n] / wall for wall, _ in ts] for n, ts in times.items()}
    cpu_rate = {n: [counts[n] / cpu for _, cpu in ts] for n, ts in times.items()}
    threads = torch.get_num_threads()
    print(f"device {device}, {threads} torch threads, {os.cpu_count()} cores; {s['images']} PNG images 512x512, "
          f"batch {s['batch']}, {s['rounds']} round(s); random weights, float32")
    print("\n| measure | images/s | x raw forward | images per CPU-second | x raw forward (CPU time) |\n"
          "|---|---:|---:|---:|---:|")
    summary = {}
    for name in names:
        ratios = [a / b for a, b in zip(rate[name], rate["raw forward"])]
        cpu_ratios = [a / b for a, b in zip(cpu_rate[name], cpu_rate["raw forward"])]
        summary[name] = statistics.median(ratios), statistics.median(cpu_ratios)
        print(f"| {name} | {statistics.median(rate[name]):.2f} | {summary[name][0]:.2f}x "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] | {statistics.median(cpu_rate[name]):.2f} | "
              f"{summary[name][1]:.2f}x [{min(cpu_ratios):.2f}, {max(cpu_ratios):.2f}] |")
    wall, cpu = summary["embed_subject"]
    verdict = lambda r: "meets" if r >= GOAL else "MISSES"
    print(f"\nembed_subject {wall:.2f}x raw forward in images/s ({verdict(wall)} >= {GOAL:.2f}x), "
          f"{cpu:.2f}x in images per CPU-second ({verdict(cpu)} >= {GOAL:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": s, "device": device, "threads": threads, "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "seconds": times, "images_per_s": rate}, indent=2))


if __name__ == "__main__":
    main()
