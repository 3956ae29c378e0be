"""How fast does the evaluation score images? Next to the raw forward throughput of its models.

    .venv/bin/python -m bench.eval_throughput            # full run, ~2 min on 2 CPU cores
    .venv/bin/python -m bench.eval_throughput --quick    # a few images, keeps the script working

The workload is one DreamBench subject: --prompts prompts x --seeds images (25 x 4 = 100),
PNG files of 512x512 (what Stable Diffusion 1.5 writes), made from the bundled dog3 photos,
which are also the subject's 6 real photos. Scoring models: DINO ViT-S/16 and CLIP ViT-B/32
with random weights (speed does not depend on the values), float32, on CUDA if present,
else the CPU.

  embed_images    Scorer.embed_images on the generated files: decode, both preprocessings,
                  DINO + CLIP image forward (worker threads prepare between forwards on the
                  CPU, during them on an accelerator)
     ceiling:     raw image forward: the same batches, preprocessed beforehand (untimed)
                  and already on the device
  embed_subject   the evaluation's scoring phase for the subject, from an empty cache:
                  the above for the generated images and the real photos, tokenising and
                  embedding the prompts' texts for CLIP-T, hashing every file, writing the cache
     ceiling:     raw subject forward: image forward of the same generated and real
                  batches + text forward of the same tokenised prompts

Rounds run every measure once, in rotating order. images/s is the median over rounds; a
ratio is per round against its ceiling of the same round, median [min, max]. Besides wall
time, this process's CPU time (all threads) is measured: images per CPU-second says what
the work costs even when other jobs slow the wall clock down. Goal: embed_subject >= 0.90x
its ceiling (decode, preprocessing and bookkeeping cost <= 10 %).
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
SETTINGS = {"full": dict(prompts=25, seeds=4, photos=6, batch=32, rounds=3),
            "quick": dict(prompts=2, seeds=2, photos=2, batch=2, rounds=1)}
# measure -> its ceiling
CEILING = {"embed_images": "raw image forward", "embed_subject": "raw subject forward"}


def make_images(folder: Path, prompts: int, seeds: int, side: int = 512) -> list:
    """`prompts` x `seeds` PNG files named `<prompt>_<seed>.png`, as the evaluation writes them."""
    from PIL import Image

    from singlora_diffusion.bundled import bundled_subject
    from singlora_diffusion.evaluation.generation import ADAPTER, GeneratedImage
    from singlora_diffusion.evaluation.protocol import Prompt

    photos = sorted(bundled_subject().glob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for p in range(prompts):
        prompt = Prompt(f"a sks dog in scene {p}")
        for seed in range(seeds):
            with Image.open(photos[(p + seed) % len(photos)]) as photo:
                image = photo.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
            path = folder / f"{prompt.text}_{seed}.png"
            image.save(path)
            images.append(GeneratedImage("bench", ADAPTER, prompt, seed, path))
    return images


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) since `start`."""
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def preprocessed(scorer, paths, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The very batches embed_images feeds the models, made once, untimed."""
    from singlora_diffusion.evaluation.scorer import prepare

    pairs = [prepare(p, scorer.dino_preprocess, scorer.clip_preprocess) for p in paths]
    return [(torch.stack([d for d, _ in pairs[i:i + batch]]).to(scorer.device),
             torch.stack([c for _, c in pairs[i:i + batch]]).to(scorer.device)) for i in range(0, len(pairs), batch)]


@torch.no_grad()
def raw_forward(scorer, batches, tokens=None) -> tuple[float, float]:
    sync(scorer.device)
    start = clock()
    for dino_in, clip_in in batches:
        scorer._forward(dino_in, clip_in)
    if tokens is not None:
        scorer.clip.encode_text(tokens).float().cpu()
    sync(scorer.device)
    return since(start)


def embed_images(scorer, paths, batch: int) -> tuple[float, float]:
    start = clock()
    scorer.embed_images(paths, batch)
    sync(scorer.device)
    return since(start)


def embed_subject(scorer, images, photos, batch: int, scratch: Path) -> tuple[float, float]:
    """The evaluation's own scoring phase for one subject, from an empty cache."""
    from singlora_diffusion.evaluation.config import EvalConfig
    from singlora_diffusion.evaluation.generation import ADAPTER
    from singlora_diffusion.evaluation.plan import Subject
    from singlora_diffusion.evaluation.scoring import embed_subject as run

    shutil.rmtree(scratch, ignore_errors=True)
    cfg = EvalConfig(out=str(scratch), subject_dir="unused", score_batch_size=batch)
    start = clock()
    run(scorer, Subject("bench", "dog", tuple(photos)), {ADAPTER: images}, cfg)
    sync(scorer.device)
    return since(start)


def run_rounds(scorer, s: dict, photos: list, work: Path) -> tuple[dict, dict, int, int]:
    """Every measure once per round, in rotating order: (times, image counts, generated images, texts)."""
    from singlora_diffusion.evaluation.protocol import clip_t_text

    images = make_images(work / "images", s["prompts"], s["seeds"])
    paths = [im.path for im in images]
    texts = sorted({clip_t_text(im.prompt.text, "sks", True) for im in images})
    generated = preprocessed(scorer, paths, s["batch"])
    subject = generated + preprocessed(scorer, photos, s["batch"])
    tokens = scorer.tokenizer(texts).to(scorer.device)
    # warm-up: first calls allocate, pick kernels and fill the page cache
    raw_forward(scorer, generated[:1], tokens)
    embed_images(scorer, paths[: s["batch"]], s["batch"])
    measures = {
        "raw image forward": lambda: raw_forward(scorer, generated),
        "embed_images": lambda: embed_images(scorer, paths, s["batch"]),
        "raw subject forward": lambda: raw_forward(scorer, subject, tokens),
        "embed_subject": lambda: embed_subject(scorer, images, photos, s["batch"], work / "cache"),
    }
    n = len(paths)
    counts = {"raw image forward": n, "embed_images": n, "raw subject forward": n + len(photos),
              "embed_subject": n + len(photos)}
    times: dict[str, list] = {name: [] for name in measures}
    names = list(measures)
    for r in range(s["rounds"]):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotating order
            times[name].append(measures[name]())
    return times, counts, n, len(texts)


def print_table(times: dict, counts: dict) -> tuple[dict, dict]:
    """The ratio table and the goal's verdict; returns (images/s, images per CPU-second) per measure."""
    rate = {m: [counts[m] / wall for wall, _ in ts] for m, ts in times.items()}
    cpu_rate = {m: [counts[m] / cpu for _, cpu in ts] for m, ts in times.items()}
    print("\n| measure | images | images/s | x ceiling | images per CPU-second | x ceiling (CPU time) |\n"
          "|---|---:|---:|---:|---:|---:|")
    summary = {}
    for name in times:
        base = CEILING.get(name, name)
        ratios = [a / b for a, b in zip(rate[name], rate[base])]
        cpu_ratios = [a / b for a, b in zip(cpu_rate[name], cpu_rate[base])]
        summary[name] = statistics.median(ratios), statistics.median(cpu_ratios)
        print(f"| {name} | {counts[name]} | {statistics.median(rate[name]):.2f} | {summary[name][0]:.2f}x "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] | {statistics.median(cpu_rate[name]):.2f} | "
              f"{summary[name][1]:.2f}x [{min(cpu_ratios):.2f}, {max(cpu_ratios):.2f}] |")
    wall, cpu = summary["embed_subject"]
    verdict = lambda r: "meets" if r >= GOAL else "MISSES"
    print(f"\nembed_subject {wall:.2f}x its raw forward in images/s ({verdict(wall)} >= {GOAL:.2f}x), "
          f"{cpu:.2f}x in images per CPU-second ({verdict(cpu)} >= {GOAL:.2f}x)")
    return rate, cpu_rate


def main(argv: list[str] | None = None) -> None:
    from singlora_diffusion.bundled import bundled_subject
    from singlora_diffusion.evaluation.scorer import Weights, load_scorer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 prompts x 2 seeds, 2 photos, batch 2, 1 round")
    for name, default in SETTINGS["full"].items():
        ap.add_argument(f"--{name}", type=int, help=f"default {default}; quick: {SETTINGS['quick'][name]}")
    ap.add_argument("--json", metavar="PATH", help="also write settings and per-round times here")
    args = ap.parse_args(argv)
    s = dict(SETTINGS["quick" if args.quick else "full"])
    s.update({k: getattr(args, k) for k in s if getattr(args, k)})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = load_scorer(Weights("dino", "random"), Weights("clip", "random"), device, True)
    photos = sorted(bundled_subject().glob("*.jpg"))[: s["photos"]]
    work = Path(tempfile.mkdtemp(prefix="eval_throughput_"))
    try:
        times, counts, n, texts = run_rounds(scorer, s, photos, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    threads = torch.get_num_threads()
    print(f"device {device}, {threads} torch threads, {os.cpu_count()} cores; {n} generated PNGs 512x512 "
          f"({s['prompts']} prompts x {s['seeds']} seeds), {len(photos)} real photos, {texts} texts, "
          f"batch {s['batch']}, {s['rounds']} round(s); random weights, float32")
    rate, cpu_rate = print_table(times, counts)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": s, "device": device, "threads": threads, "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "seconds_wall_cpu": times, "images_per_s": rate,
            "images_per_cpu_s": cpu_rate}, indent=2))


if __name__ == "__main__":
    main()
