"""python -m singlora_diffusion.toy {pretrain,demo,subjects}: make the toy base; score and picture the demo.

  pretrain [--quick] [--out DIR] [--threads N]   the toy base's pretraining (toy/pretrain.py)
  demo OUTPUT_DIR                                after `train_dreambooth.py --config demo`: base vs
                                                 adapter picture and toy scores (toy/demo.py)
  subjects [--out DIR]                           the grid rehearsal's extra subjects (toy/world.py's
                                                 GRID_SUBJECTS; default: the package's assets/toy_subjects)
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m singlora_diffusion.toy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain the toy base (toy:shapes) and write its shipped files")
    p.add_argument("--out", type=Path, default=None, help="folder of the files (default: the package's "
                   "assets/toy_shapes, what toy:shapes loads)")
    p.add_argument("--quick", action="store_true", help="a seconds-long version (what the tests run)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisation and the batches")
    p.add_argument("--denoiser_steps", type=int, default=None, help="text encoder + UNet steps (default: "
                   "PretrainSettings', those of the shipped base)")
    d = sub.add_parser("demo", help="score the demo's adapter against the toy base; draw before_after.png")
    d.add_argument("output_dir", type=Path, help="the training output folder (outputs/demo)")
    s = sub.add_parser("subjects", help="write the grid rehearsal's extra toy subjects (blue circle, ...)")
    s.add_argument("--out", type=Path, default=None, help="default: the package's assets/toy_subjects")
    args = parser.parse_args(argv)
    if args.command == "subjects":
        from ..bundled import bundled_subject
        from .world import GRID_SUBJECTS, write_subject

        out = args.out or bundled_subject("toy_subjects")
        for name, (shape, colour, seed) in GRID_SUBJECTS.items():
            write_subject(out / name, shape, colour, seed)
        print(f"wrote {', '.join(GRID_SUBJECTS)} in {out}")
        return 0
    if args.command == "demo":
        from ..dataclass_cli import run_command
        from .demo import run

        return run_command("demo", lambda: run(args.output_dir))
    import torch

    from .base import world_folder
    from .pretrain import QUICK, PretrainSettings, pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = replace(QUICK if args.quick else PretrainSettings(), seed=args.seed)
    if args.denoiser_steps:
        settings = replace(settings, denoiser_steps=args.denoiser_steps)
    pretrain(args.out or world_folder(), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
