"""python -m experiments.toy_world {sweep,ramp} [--quick] [--world DIR]: see docs/science.md.

The runs fine-tune a toy base and score with its feature extractor: by default the package's
shipped toy:shapes, else a folder made by `python -m singlora_diffusion.toy pretrain --out DIR`
(the quick test pretrains one with --quick). This command does not pretrain.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.toy_world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (("sweep", "learning-rate stability (paper Fig. 2)"),
                       ("ramp", "ramp length and initialisation (paper App. A.1)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--quick", action="store_true", help="a one-minute version (what the tests run)")
        p.add_argument("--world", type=Path, default=None,
                       help="folder of a toy base written by `python -m singlora_diffusion.toy pretrain --out DIR` "
                            "(default: the shipped toy:shapes)")
        p.add_argument("--out", type=Path, default=None,
                       help="folder of the results (default results/toy_world, or results/toy_world_quick)")
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
        p.add_argument("--plots", type=Path, default=None, help="folder of the PNGs (default docs/science, "
                       "or the --out folder with --quick)")
    args = parser.parse_args(argv)
    import torch

    from .sweep import main as sweep_main

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("results") / ("toy_world_quick" if args.quick else "toy_world")
    plots = args.plots or (out if args.quick else Path("docs") / "science")
    return sweep_main(args.command, args.world, out, args.quick, plots)


if __name__ == "__main__":
    sys.exit(main())
