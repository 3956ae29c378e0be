"""`python -m experiments.toy_base_targets`: issue 15's targets for the shipped toy base, measured.

For each method and seed: the demo's training (configs/demo.yaml, its seed changed; LoRA
runs change only the adapter) and the demo's toy evaluation (toy/demo.py: 6 prompts naming
the subject, 4 seeds each, base and adapter). Writes results/toy_base_targets.json and
prints medians over seeds; docs/science.md section 5 reports them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_one(adapter: str, seed: int, steps: int | None, work: Path) -> dict:
    from singlora_diffusion.toy.demo import demo_scores, evaluate_adapter
    from singlora_diffusion.training import parse_config, train

    out = work / f"{adapter}-s{seed}"
    argv = ["--config", "demo", "--output_dir", str(out), "--seed", str(seed), "--init_seed", str(seed),
            "--adapter", adapter, "--report_to", "none", "--checkpointing_steps", "1000000"]
    if steps:
        argv += ["--max_train_steps", str(steps)]
    started = time.perf_counter()
    train(parse_config(argv))
    trained = time.perf_counter() - started
    scores = demo_scores(evaluate_adapter(out, work / f"eval-{adapter}-s{seed}"))
    return {"adapter": adapter, "seed": seed, "train_seconds": trained, **scores}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.toy_base_targets", description=__doc__)
    p.add_argument("--adapters", nargs="+", default=["singlora", "lora"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo preset's)")
    p.add_argument("--out", type=Path, default=Path("results") / "toy_base_targets.json")
    args = p.parse_args(argv)
    import torch

    from singlora_diffusion.toy.base import fingerprint

    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if data.get("fingerprint") != fingerprint() or data.get("steps") != args.steps:
        data = {"fingerprint": fingerprint(), "steps": args.steps, "threads": torch.get_num_threads(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="toy-targets-") as work:
        for adapter in args.adapters:
            for seed in args.seeds:
                key = f"{adapter}-s{seed}"
                if key not in data["runs"]:
                    data["runs"][key] = run_one(adapter, seed, args.steps, Path(work))
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(data, indent=1))
                print(key, json.dumps(data["runs"][key]), flush=True)
    print("\n| method | base subject | adapter subject | base background | adapter background | adapter/base "
          "background | training s |\n|---|---:|---:|---:|---:|---:|---:|")
    for adapter in args.adapters:
        runs = [data["runs"][f"{adapter}-s{s}"] for s in args.seeds]
        med = lambda f: statistics.median(f(r) for r in runs)
        print(f"| {adapter} | {med(lambda r: r['base']['subject']):.2f} | {med(lambda r: r['adapter']['subject']):.2f} "
              f"| {med(lambda r: r['base']['prompt']):.2f} | {med(lambda r: r['adapter']['prompt']):.2f} "
              f"| {med(lambda r: r['adapter']['prompt'] / max(r['base']['prompt'], 1e-9)):.2f} "
              f"| {med(lambda r: r['train_seconds']):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
