"""What `--compile` costs and gives at the tiny and the real size: the compile, and steps/s after it.

    .venv/bin/python -m bench.compile_cost             # tiny:sd15 64 px and random:sd15 256 px, ~5 min on 2 cores
    .venv/bin/python -m bench.compile_cost --quick     # tiny:sd15 only, 2 timed steps: keeps it working

Our trainer with SingLoRA (rank 8 on the attn preset, caching on, batch 1, fp32, the bundled
photos) three times per base, each in a fresh process: eager; `--compile` with an empty
inductor cache (what a user's first compiled run pays); `--compile` again with the cache that
run left (what every later run pays); cache files = the files in that inductor cache after
the run (0 would mean nothing was compiled). first step = from fit() to the first optimizer step:
the compile, on diffusers' regional compilation of the repeated blocks, plus one step.
steps/s = 1 / median time between the optimizer steps after it. random:sd15 is SD1.5's real
UNet (860M parameters), text encoder and VAE with random weights; 256 px keeps a CPU step short
(the compiled graphs are the same blocks at other token counts).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.runs import in_fresh_process, trainer_flags

SIZES = {"tiny": ("tiny:sd15", 64, 6), "real": ("random:sd15", 256, 4)}  # base, px, timed steps
RUNS = ("eager", "compile, cold cache", "compile, warm cache")


def child(spec: dict) -> None:
    if spec["cache"]:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = spec["cache"]  # read when inductor first compiles
    from bench.runs import train_here

    r = train_here("ours", spec["argv"])
    Path(spec["result"]).write_text(json.dumps(dict(stamps=r["stamps"], fit_start=r["fit_start"])))


def run_one(base: str, px: int, steps: int, compiled: bool, cache: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="singlora-compile-") as tmp:
        argv = trainer_flags("ours", base, px, steps + 1, f"{tmp}/out") + ["--adapter", "singlora"]
        spec = dict(argv=argv + (["--compile", "true"] if compiled else []), cache=cache)
        r = in_fresh_process("bench.compile_cost", spec, tmp)
    if "error" in r:
        return r
    times = [b - a for a, b in zip(r["stamps"], r["stamps"][1:])]
    files = None if cache is None else sum(len(f) for _, _, f in os.walk(cache))
    return dict(first_step=r["stamps"][0] - r["fit_start"], steps_per_s=1 / statistics.median(times), cache_files=files)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny:sd15 only, 2 timed steps")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    import torch

    from singlora_diffusion.pipelines import resolve_base

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    lines = ["| base | run | first step (s) | steps/s | x eager | cache files |", "|---|---|---:|---:|---:|---:|"]
    start, failed = time.perf_counter(), False
    for size in ["tiny"] if args.quick else args.sizes:
        name, px, steps = SIZES[size]
        steps = 2 if args.quick else steps
        base = resolve_base(name)  # built once, before any clock
        with tempfile.TemporaryDirectory(prefix="singlora-inductor-") as cache:
            rows = {run: run_one(base, px, steps, run != "eager", None if run == "eager" else cache) for run in RUNS}
        for run, r in rows.items():
            if "error" in r:
                failed = True
                lines.append(f"| {name} {px} px | {run} | failed: {r['error']} | | | |")
                continue
            x = r["steps_per_s"] / rows["eager"]["steps_per_s"] if "error" not in rows["eager"] else None
            lines.append(f"| {name} {px} px | {run} | {r['first_step']:.1f} | {r['steps_per_s']:.3f} "
                         f"| {'n/a' if x is None else f'{x:.2f}x'} | {'-' if r['cache_files'] is None else r['cache_files']} |")
            print(f"  {name} {px} px {run:20s} first step {r['first_step']:.1f} s, {r['steps_per_s']:.3f} steps/s",
                  flush=True)
    print("\n" + "\n".join(lines))
    print(f"\n({time.perf_counter() - start:.0f} s; load average now {os.getloadavg()[0]:.2f})")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
