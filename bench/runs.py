"""One training run in this process, ours or one of diffusers' example scripts, measured the same way.

The benchmarks start a fresh process per configuration (so its peak memory is its own) and call
`train_here` in it. diffusers' scripts are not in the diffusers wheel: pass a copy (from a clone of
huggingface/diffusers, kept outside this repository); they run unmodified.
"""
from __future__ import annotations

import resource
import runpy
import sys
import time


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # peak so far; Linux: KiB


def run_diffusers_script(script: str, argv: list[str]) -> None:
    import accelerate.accelerator

    # The one environment shim: the scripts hand --report_to to Accelerator(log_with=),
    # which refuses "none". No tracker then, as in our runs; the script runs unmodified.
    real = accelerate.accelerator.filter_trackers
    accelerate.accelerator.filter_trackers = lambda log_with, *a: [] if log_with == "none" else real(log_with, *a)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def train_here(trainer: str, argv: list[str], script: str | None = None) -> dict:
    """Train with `argv` ("ours": our phases validate -> build -> fit; "diffusers": `script`).

    Returns stamps (the time after every optimizer step, from one global post-hook: one clock
    for both trainers), the peak RSS after loading (ours only), after each step and overall
    (which includes what a script does after training: diffusers' reloads a whole pipeline),
    and the CUDA peak.
    """
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    at_step: list[float] = []  # peak RSS so far, read right after each optimizer step

    def stamp(*_):
        stamps.append(time.perf_counter())
        at_step.append(rss_gb())
    register_optimizer_step_post_hook(stamp)
    loaded = None
    if trainer == "ours":
        from singlora_diffusion.training.build import build, validate
        from singlora_diffusion.training.config import parse_config
        from singlora_diffusion.training.loop import fit
        from singlora_diffusion.training.run import make_accelerator

        cfg = parse_config(argv)  # train(cfg) less class images, trackers and the final export
        inputs = validate(cfg)
        accelerator = make_accelerator(cfg)
        trainee = build(cfg, inputs, accelerator.device)
        loaded = rss_gb()
        fit(cfg, trainee, inputs, accelerator, log=lambda *_: None)
    else:
        run_diffusers_script(script, argv)
    cuda = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
    return dict(stamps=stamps, loaded_rss=loaded, rss_at_steps=at_step, peak_rss=rss_gb(), cuda_peak=cuda)
