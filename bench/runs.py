"""One training run in this process, ours or one of diffusers' example scripts, measured the same way.

The benchmarks start a fresh process per configuration (so its peak memory is its own) and call
`train_here` in it. diffusers' scripts are not in the diffusers wheel: pass a copy (from a clone of
huggingface/diffusers, kept outside this repository); they run unmodified.
"""
from __future__ import annotations

import json
import os
import resource
import runpy
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "singlora_diffusion" / "assets" / "dog3"  # the bundled photos every benchmark trains on


def trainer_flags(trainer: str, base: str, resolution: int, steps: int, out: str, precision: str = "no",
                  checkpointing_steps: int | None = None, gradient_checkpointing: bool = False) -> list[str]:
    """The settings our trainer and diffusers' scripts share, in each one's spelling (ours follows diffusers').

    Batch 1, rank 8, lr 1e-4 constant, seed 0, no tracker, the bundled photos center-cropped; ours
    on the attn preset (to_q, to_k, to_v, to_out.0 with alpha = rank, as diffusers' LoraConfig).
    """
    common = ["--pretrained_model_name_or_path", base, "--instance_data_dir", str(IMAGES), "--instance_prompt",
              "a photo of sks dog", "--resolution", str(resolution), "--train_batch_size", "1", "--max_train_steps",
              str(steps), "--rank", "8", "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--seed", "0",
              "--checkpointing_steps", str(checkpointing_steps or steps + 1), "--report_to", "none",
              "--mixed_precision", precision, "--output_dir", out]
    common += ["--gradient_checkpointing"] if gradient_checkpointing else []
    if trainer == "ours":
        return common + ["--center_crop", "true", "--target_modules", "attn"]
    return common + ["--center_crop", "--lr_warmup_steps", "0"]


def in_fresh_process(module: str, spec: dict, tmp: str) -> dict:
    """Run `python -m module --child SPEC` (its peak memory is its own); its JSON result, or {"error": ...}."""
    spec = dict(spec, result=f"{tmp}/result-{time.monotonic_ns()}.json")
    proc = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(spec)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0 or not Path(spec["result"]).is_file():  # e.g. a script that calls sys.exit(0)
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return dict(error=f"exit {proc.returncode}: {lines[-1] if lines else ''}"[:300])
    return json.loads(Path(spec["result"]).read_text())


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
    for both trainers), fit_start (ours: the time fit began), the peak RSS after loading (ours only), after each step and overall
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
        from singlora_diffusion.training import build, fit, make_accelerator, parse_config, validate
        from singlora_diffusion.training.build import encode_prompts_once

        cfg = parse_config(argv)  # train(cfg) less class images, trackers and the final export
        inputs = validate(cfg)
        accelerator = make_accelerator(cfg)
        trainee = build(cfg, inputs, accelerator.device)
        encode_prompts_once(cfg, trainee, inputs)  # as train(): prompts cached, text encoders freed
        loaded = rss_gb()
        fit_start = time.perf_counter()  # the first step's time then includes what --compile compiles
        fit(cfg, trainee, inputs, accelerator, log=lambda *_: None)
    else:
        fit_start = None  # inside the script, after its own loading: not visible from here
        run_diffusers_script(script, argv)
    cuda = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
    return dict(stamps=stamps, fit_start=fit_start, loaded_rss=loaded, rss_at_steps=at_step, peak_rss=rss_gb(), cuda_peak=cuda)
