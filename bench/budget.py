"""How close the web UI's request budget comes to what a render really costs.

    .venv/bin/python -m bench.budget            # tiny SD1.5, 64-256 px, ~2 min on 2 cores
    .venv/bin/python -m bench.budget --quick    # two small sizes: keeps it working

For each request the web UI's Engine estimates seconds (FLOPs counted on the meta device /
the machine's measured matmul speed x budget.EFFICIENCY) and peak activation bytes; then the
same request is rendered in a fresh process, timed, and its peak RSS growth over the loaded
model read. The ratios real / estimated are what the limits rest on: a ratio near 1 means a
request refused at "600 s" would really have taken about that long.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.runs import ROOT, in_fresh_process

SIZES = [(64, 1, 20), (128, 1, 10), (128, 4, 5), (256, 1, 3)]  # (side, images, steps)


def child(spec: dict) -> None:
    Path(spec["result"]).write_text(json.dumps(measure(spec["base"], spec["side"], spec["images"], spec["steps"])))


def measure(base: str, side: int, images: int, steps: int) -> dict:
    import resource
    import tempfile
    import time

    import psutil

    from singlora_diffusion.generate import render
    from singlora_diffusion.webui.engine import Engine
    from singlora_diffusion.webui.requests import GenerateRequest

    engine = Engine(base, tempfile.mkdtemp())
    req = GenerateRequest("a photo of a dog", steps=steps, num_images=images, width=side, height=side)
    cost = engine.cost(req)
    render(engine.pipe, req.prompt, steps=1, width=64, height=64)  # warm-up
    rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    render(engine.pipe, req.prompt, steps=steps, width=side, height=side, num_images=images)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"side": side, "images": images, "steps": steps, "tflop": cost.flops / 1e12,
            "estimated_s": engine.limits().seconds(cost), "real_s": seconds,
            "estimated_peak_mb": cost.peak_bytes / 2 ** 20, "real_growth_mb": max(0, peak - rss) / 2 ** 20}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="tiny:sd15")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "results" / "budget.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = [in_fresh_process("bench.budget", dict(base=args.base, side=side, images=n, steps=steps), tmp)
                for side, n, steps in (SIZES[:2] if args.quick else SIZES)]
    failed = [r["error"] for r in rows if "error" in r]
    if failed:
        raise SystemExit(f"bench.budget: a run failed: {failed[0]}")
    print(f"{'request':>22} {'TFLOP':>7} {'est. s':>7} {'real s':>7} {'real/est':>8} "
          f"{'est. MB':>8} {'real MB':>8}")
    for r in rows:
        print(f"{r['side']:>5} px x{r['images']} x{r['steps']:>3} steps {r['tflop']:7.3f} {r['estimated_s']:7.1f} "
              f"{r['real_s']:7.1f} {r['real_s'] / r['estimated_s']:8.2f} {r['estimated_peak_mb']:8.0f} "
              f"{r['real_growth_mb']:8.0f}")
    if not args.quick:
        Path(args.out).write_text(json.dumps({"base": args.base, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
