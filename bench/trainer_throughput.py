"""How fast does our DreamBooth trainer train? Steps/s and peak memory, next to diffusers' script.

    .venv/bin/python -m bench.trainer_throughput --diffusers_script PATH  # full run, ~9 min on 2 cores
    .venv/bin/python -m bench.trainer_throughput                          # our trainer only, ~5 min
    .venv/bin/python -m bench.trainer_throughput --quick                  # tiny pipeline, keeps it working

Base: the tiny SD1.5 pipeline with an SD-architecture UNet of 17.6M parameters and a 4-block
VAE (256 px -> 32x32 latents), random weights, saved once as a local folder; fp32, CPU.
Ours: --adapter lora / singlora (preset attn, rank 8), latent and prompt caching on (default)
and off, and --adapter loraplus without caching (its step should cost lora's); batch 1, center
crop, no validation, no tracker, no checkpoint in the timed steps.
singlora+buckets+captions: the same photos cut to three aspect ratios, --enable_bucket
(resolution/2 .. 2 x resolution) and a caption file per photo, caching on and off.
PATH: a copy of diffusers' examples/dreambooth/train_dreambooth_lora.py (not in the wheel), run
unmodified at the same settings, with and without --pre_compute_text_embeddings.

Each run is a fresh process (ru_maxrss = its peak) running our phases validate -> build -> fit,
or the whole diffusers script. A global optimizer step post-hook stamps every optimizer step;
after `warmup` steps each interval is one whole step (data, noise, forward, backward, clipping,
AdamW, logging), one clock for both trainers, loading and final save outside it. steps/s =
1 / median step: a step stalled by other work on a shared machine does not move it. Rounds run
every configuration in rotating order; ratios are within a round, median [min, max] over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.runs import in_fresh_process, trainer_flags

NO_CACHE = ["--cache_latents", "false", "--cache_text_embeddings", "false"]
# name -> (trainer, extra flags, what is encoded once instead of every step)
CONFIGS = {
    "lora": ("ours", ["--adapter", "lora", *NO_CACHE], "-"),
    "lora+cache": ("ours", ["--adapter", "lora"], "latents, prompt"),
    "loraplus": ("ours", ["--adapter", "loraplus", *NO_CACHE], "-"),  # LoRA with B's group at 16x: LoRA's cost?
    "singlora": ("ours", ["--adapter", "singlora", *NO_CACHE], "-"),
    "singlora+cache": ("ours", ["--adapter", "singlora"], "latents, prompt"),
    # kohya-style data: the photos in aspect-ratio buckets, a caption file per photo (CAPTIONED below)
    "singlora+buckets+captions": ("ours", ["--adapter", "singlora", *NO_CACHE, "BUCKETS_AND_CAPTIONS"], "-"),
    "singlora+buckets+captions+cache": ("ours", ["--adapter", "singlora", "BUCKETS_AND_CAPTIONS"],
                                        "latents, prompts"),
    # the speed options (issue 18), on our defaults and at diffusers' work per step
    "singlora+compile": ("ours", ["--adapter", "singlora", *NO_CACHE, "--compile", "true"], "-"),
    "singlora+cache+compile": ("ours", ["--adapter", "singlora", "--compile", "true"], "latents, prompt"),
    "singlora+cache+channels_last": ("ours", ["--adapter", "singlora", "--channels_last", "true"], "latents, prompt"),
    "singlora+cache+fused_adamw": ("ours", ["--adapter", "singlora", "--fused_adamw", "true"], "latents, prompt"),
    "singlora+cache+all": ("ours", ["--adapter", "singlora", "--compile", "true", "--channels_last", "true",
                                    "--fused_adamw", "true"], "latents, prompt"),
    "diffusers": ("diffusers", [], "-"),
    "diffusers+pre": ("diffusers", ["--pre_compute_text_embeddings"], "prompt"),
}
BASELINE, GOAL = "lora", 1.10  # the spec's goal: our trainer >= 1.10x diffusers' steps/s
SETTINGS = {"full": dict(resolution=256, warmup=3, steps=20, rounds=5),
            "quick": dict(resolution=64, warmup=1, steps=3, rounds=1)}


def captioned_photos(folder: Path) -> Path:
    """The bundled photos (all square) cut to square, 4:3 and 3:4 in turn, so that they fill three
    buckets, each with a caption of its own beside it (photo.txt); built once."""
    import shutil

    from PIL import Image

    from bench.runs import IMAGES

    if not folder.is_dir():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, photo in enumerate(sorted(IMAGES.glob("*.jpg"))):
            with Image.open(photo) as image:
                w, h = image.size
                box = [(0, 0, w, h), (0, h // 8, w, h - h // 8), (w // 8, 0, w - w // 8, h)][i % 3]
                image.crop(box).save(tmp / photo.name)
            (tmp / photo.name).with_suffix(".txt").write_text(f"a photo of sks dog, view {i}")
        tmp.rename(folder)
    return folder


def buckets_and_captions(resolution: int, photos: Path) -> list[str]:
    return ["--instance_data_dir", str(photos), "--caption_extension", ".txt", "--enable_bucket",
            "--min_bucket_reso", str(resolution // 2), "--max_bucket_reso", str(resolution * 2),
            "--bucket_reso_steps", str(resolution // 4)]


def cores() -> int:
    return len(os.sched_getaffinity(0))


def build_bench_pipeline():
    """The 17.6M-UNet / 4-block-VAE pipeline: the tiny SD1.5 text encoder (width 48, seed 2) and tokenizer."""
    from singlora_diffusion import tiny

    # bench/adapter_overhead.py's full-size UNet, cross-attending to the width-48 text
    unet = tiny.sd_unet(48, seed=0, block_out_channels=(64, 128, 256), attention_head_dim=8, plain_last=True)
    # 4 blocks = 3 downsamplings: 256 px -> 32x32, as SD's VAE maps 512 -> 64; seed None: drawn on
    # from the UNet's stream, so the weights are those of every earlier run of this benchmark
    vae = tiny.vae(seed=None, block_out_channels=(32, 64, 64, 64), sample_size=256)
    return tiny.sd_pipeline(unet, vae, tiny.text_encoder(48, seed=2))


def save_bench_pipeline(folder: Path) -> Path:
    """build_bench_pipeline() saved once as `folder` (built aside, then renamed)."""
    from singlora_diffusion.pipelines import save_pipeline_once

    return save_pipeline_once(folder, lambda tmp: build_bench_pipeline().save_pretrained(tmp))


def child(spec: dict) -> None:
    """One configuration in this fresh process; writes step time stamps and peak RSS to spec['result']."""
    import torch

    from bench.runs import train_here

    torch.set_num_threads(spec["threads"])
    r = train_here(spec["trainer"], spec["argv"], spec["script"])
    Path(spec["result"]).write_text(json.dumps(dict(stamps=r["stamps"], fit_start=r["fit_start"],
                                                    peak=r["peak_rss"] * 2 ** 30)))


def run_one(name: str, s: dict, base: str, script: str | None) -> dict:
    trainer, extra, _ = CONFIGS[name]
    if "BUCKETS_AND_CAPTIONS" in extra:
        i = extra.index("BUCKETS_AND_CAPTIONS")
        extra = extra[:i] + buckets_and_captions(s["resolution"], Path(s["captioned"])) + extra[i + 1:]
    n_steps = s["warmup"] + s["steps"]
    with tempfile.TemporaryDirectory(prefix="singlora-bench-") as tmp:
        spec = dict(trainer=trainer, script=script, threads=cores(),
                    argv=trainer_flags(trainer, base, s["resolution"], n_steps, f"{tmp}/out") + extra)
        r = in_fresh_process("bench.trainer_throughput", spec, tmp)
    if "error" in r:
        return dict(error=f"{name}: {r['error']}")
    if len(r["stamps"]) != n_steps:
        return dict(error=f"{name}: expected {n_steps} optimizer steps, saw {len(r['stamps'])}")
    times = [b - a for a, b in zip(r["stamps"][s["warmup"] - 1:], r["stamps"][s["warmup"]:])]
    first = None if r["fit_start"] is None else r["stamps"][0] - r["fit_start"]  # compile included
    return dict(steps_per_s=1 / statistics.median(times), mean_step=statistics.fmean(times), peak=r["peak"],
                first_step=first, times=times)


def run(names: list[str], s: dict, base: str, script: str | None) -> dict[str, list[dict]]:
    """Per configuration one result per round; the order rotates so that drift hits all alike."""
    results: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(s["rounds"]):
        k = rnd % len(names)
        for name in names[k:] + names[:k]:
            r = run_one(name, s, base, script)
            results[name].append(r)
            print(f"  round {rnd + 1}/{s['rounds']} {name:15s} "
                  + ("FAILED" if "error" in r else f"{r['steps_per_s']:.2f} steps/s"), flush=True)
    return results


def paired(results: dict[str, list[dict]], name: str, ref: str) -> tuple[float, float, float] | None:
    """Median, min, max over rounds of steps/s(name) / steps/s(ref) within the same round."""
    ratios = [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(results[name], results.get(ref, []))
              if "error" not in a and "error" not in b]
    return (statistics.median(ratios), min(ratios), max(ratios)) if ratios else None


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, rs in results.items():
        ok = [r for r in rs if "error" not in r]
        med = lambda key: statistics.median(r[key] for r in ok) if ok and ok[0].get(key) is not None else None  # noqa: E731
        rows.append(dict(name=name, trainer=CONFIGS[name][0], errors=[r["error"] for r in rs if "error" in r],
                         steps_per_s=med("steps_per_s"), mean_step=med("mean_step"), peak=med("peak"),
                         first_step=med("first_step"), rounds=rs,
                         x_base=paired(results, name, BASELINE), x_diffusers=paired(results, name, "diffusers")))
    return rows


def table(rows: list[dict]) -> str:
    ratio = lambda x: "n/a" if x is None else f"{x[0]:.2f}x [{x[1]:.2f}, {x[2]:.2f}]"  # noqa: E731
    lines = ["| configuration | trainer | encoded once | steps/s | x lora | x diffusers | mean step (s) "
             "| first step (s) | peak RSS (MB) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        trainer = "ours" if r["trainer"] == "ours" else "diffusers train_dreambooth_lora.py"
        head = f"| {r['name']} | {trainer} | {CONFIGS[r['name']][2]} |"
        first = "n/a" if r["first_step"] is None else f"{r['first_step']:.1f}"
        lines.append(head + (" failed | n/a | n/a | n/a | n/a | n/a |" if r["steps_per_s"] is None else
                             f" {r['steps_per_s']:.2f} | {ratio(r['x_base'])} | {ratio(r['x_diffusers'])} "
                             f"| {r['mean_step']:.3f} | {first} | {r['peak'] / 2**20:.0f} |"))
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """The goal, judged as printed (2 decimals); a missing measurement never passes."""
    by, out = {r["name"]: r for r in rows}, []
    for name, what in (("singlora+cache", "singlora, our defaults (caching on)"),
                       ("singlora+cache+all", "singlora, our defaults with every speed option"),
                       ("singlora", "singlora, no caching (diffusers' work per step)"),
                       ("singlora+compile", "singlora, no caching, --compile (diffusers' work per step)"),
                       ("lora", "lora, no caching (diffusers' adapter and work per step)")):
        x = by[name]["x_diffusers"] if name in by else None
        if x is not None:
            out.append(f"{what}: {x[0]:.2f}x diffusers' steps/s "
                       f"({'meets' if round(x[0], 2) >= GOAL else 'MISSES'} >= {GOAL:.2f}x)")
    out = out or ["no diffusers comparison (pass --diffusers_script PATH to run one)"]
    for name, ref in (("singlora+cache", "singlora"), ("singlora+buckets+captions+cache", "singlora+buckets+captions")):
        x = paired({n: by[n]["rounds"] for n in (name, ref) if n in by}, name, ref) if name in by else None
        if x is not None:
            out.append(f"caching speed-up, {ref}: {x[0]:.2f}x [{x[1]:.2f}, {x[2]:.2f}] steps/s vs no caching")
    for option in ("compile", "channels_last", "fused_adamw", "all"):
        name, ref = f"singlora+cache+{option}", "singlora+cache"
        x = paired({n: by[n]["rounds"] for n in (name, ref) if n in by}, name, ref) if name in by else None
        if x is not None:
            out.append(f"--{option.replace('all', 'compile --channels_last --fused_adamw')}: {x[0]:.2f}x "
                       f"[{x[1]:.2f}, {x[2]:.2f}] steps/s vs singlora+cache")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny pipeline at 64 px, 4 steps, 1 round: < 1 minute")
    ap.add_argument("--steps", type=int, help="timed steps per run (default 20; quick: 3)")
    ap.add_argument("--warmup", type=int, help="untimed first steps per run, >= 1 (default 3; quick: 1)")
    ap.add_argument("--rounds", type=int, help="runs of every configuration (default 5; quick: 1)")
    ap.add_argument("--diffusers_script", metavar="PATH", help="your copy of diffusers' examples/dreambooth/"
                    "train_dreambooth_lora.py, to compare against (it is not in the diffusers wheel)")
    ap.add_argument("--pipeline_dir", default="/tmp/singlora_bench/sd-unet18m-256",
                    help="where the benchmark's base pipeline is built once and reused (the captioned photos "
                         "go beside it)")
    ap.add_argument("--configs", metavar="A,B", help="run only these configurations (default: all): "
                    + ", ".join(CONFIGS))
    ap.add_argument("--json", metavar="PATH", help="also write settings and every run's step times here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    s = dict(SETTINGS["quick" if args.quick else "full"])
    s.update({k: getattr(args, k) for k in ("steps", "warmup", "rounds") if getattr(args, k) is not None})
    if min(s["warmup"], s["steps"], s["rounds"]) < 1:
        ap.error("--warmup, --steps and --rounds must be >= 1 (the last warm-up step starts the clock)")
    from singlora_diffusion.pipelines import resolve_base

    base = resolve_base("tiny:sd15") if args.quick else str(save_bench_pipeline(Path(args.pipeline_dir)))
    s["captioned"] = str(captioned_photos(Path(args.pipeline_dir).parent / "dog3-captioned"))
    script = str(Path(args.diffusers_script).resolve()) if args.diffusers_script else None
    names = [n for n, (trainer, *_) in CONFIGS.items() if trainer == "ours" or script]
    if args.configs:
        unknown = sorted(set(args.configs.split(",")) - set(CONFIGS))
        if unknown:
            ap.error(f"unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
        names = [n for n in names if n in args.configs.split(",")]
    import diffusers
    import torch

    what = "tiny SD1.5 pipeline" if args.quick else "SD-architecture UNet of 17.6M parameters, 4-block VAE"
    print(f"base: {base} ({what}), {s['resolution']} px, batch 1, fp32, CPU, {cores()} threads, "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"rank 8 on to_q, to_k, to_v, to_out.0; {s['warmup']} warm-up + {s['steps']} timed steps per run; "
          f"{s['rounds']} round(s) of {len(names)} runs in rotating order, one fresh process each; "
          f"load average {os.getloadavg()[0]:.2f}\n", flush=True)
    start = time.perf_counter()
    rows = summarize(run(names, s, base, script))
    print("\n" + table(rows))
    print("\nsteps/s = 1 / median time from one optimizer step to the next, median over rounds; a mean step\n"
          "  well above 1 / steps/s means other work stalled some steps. x lora, x diffusers = median [min, max]\n"
          "  over rounds of the within-round ratio of steps/s to lora without caching / to diffusers.\n"
          "peak RSS = ru_maxrss of the run's process (imports, models, training), median over rounds.")
    print("\n" + "\n".join(verdicts(rows)))
    print("".join(f"\n{e}\n" for r in rows for e in r["errors"]), end="", file=sys.stderr)
    print(f"\n({time.perf_counter() - start:.0f} s; load average now {os.getloadavg()[0]:.2f})")
    if args.json:
        settings = dict(s, base=base, threads=cores(), torch=torch.__version__, diffusers=diffusers.__version__,
                        machine=platform.machine(), diffusers_script=script)
        Path(args.json).write_text(json.dumps(dict(settings=settings, rows=rows), indent=2))
    if any(r["errors"] and r["trainer"] == "ours" for r in rows):
        sys.exit(1)  # a failed diffusers run is reported, not fatal: it is someone else's script


if __name__ == "__main__":
    main()
