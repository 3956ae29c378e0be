"""python -m experiments.toy_world {pretrain,sweep,ramp} [--quick]: see docs/science.md."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name: (full, quick) settings
PRETRAIN = {"n_images": (8000, 512), "vae_steps": (600, 60), "denoiser_steps": (3000, 60),
            "extractor_steps": (600, 40), "batch": (32, 16)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.toy_world", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("pretrain", "sweep", "ramp"):
        p = sub.add_parser(name)
        p.add_argument("--quick", action="store_true", help="a 1-2 minute version (what the tests run)")
        p.add_argument("--out", type=Path, default=None,
                       help="folder of the toy world (default results/toy_world, or results/toy_world_quick)")
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
        p.add_argument("--plots", type=Path, default=None, help="folder of the PNGs (default docs/science, "
                       "or the --out folder with --quick)")
    sub.choices["pretrain"].add_argument("--seed", type=int, default=0, help="seed of data, init and batches")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("results") / ("toy_world_quick" if args.quick else "toy_world")
    plots = args.plots or (out if args.quick else Path("docs") / "science")
    plots.mkdir(parents=True, exist_ok=True)
    if args.command == "pretrain":
        from .pretrain import pretrain

        settings = {k: v[1 if args.quick else 0] for k, v in PRETRAIN.items()}
        pretrain(out, seed=args.seed, **settings)
        from .report import pretrain_figure

        pretrain_figure(out, plots / "toy_world_pretrain.png")
        return 0
    from .sweep import main as sweep_main

    return sweep_main(args.command, out, args.quick, plots)


if __name__ == "__main__":
    sys.exit(main())
