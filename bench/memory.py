"""Peak memory of DreamBooth training at real size, under the trainer's memory options, next to
diffusers' own scripts at equal settings.

    .venv/bin/python -m bench.memory --diffusers_scripts DIR   # SD1.5 512 px + SDXL 1024 px, ~35 min on 2 cores
    .venv/bin/python -m bench.memory --arch sd15               # SD1.5 only, ours only
    .venv/bin/python -m bench.memory --quick                   # tiny pipelines at 64 px: keeps it working

Bases: random:sd15 and random:sdxl (the real component configs, random weights, built once).
Every configuration is a fresh process that loads the base and takes 2 optimizer steps (the
second with AdamW's state allocated), batch 1, rank 8 on to_q, to_k, to_v, to_out.0, the
bundled photos center-cropped, no validation, no tracker. Peak = ru_maxrss of that process
(imports, models, training), read right after the second optimizer step and, as a second
column, at the process's end (diffusers' scripts reload a whole pipeline after training). For our
trainer the peak right after loading is recorded too, so the step's own share shows. DIR holds copies of diffusers' examples/dreambooth/
train_dreambooth_lora.py and train_dreambooth_lora_sdxl.py (not in the wheel), run unmodified.
On a CPU memory is RSS; bench/gpu_check.sh measures torch.cuda.max_memory_allocated on a GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.runs import in_fresh_process, trainer_flags

GC, NO_CACHE = ["--gradient_checkpointing"], ["--cache_latents", "false", "--cache_text_embeddings", "false"]
SCRIPTS = {"sd15": "train_dreambooth_lora.py", "sdxl": "train_dreambooth_lora_sdxl.py"}
RESOLUTION = {"sd15": 512, "sdxl": 1024}
# (arch, name, trainer, precision, extra flags, what it shows); the first row of an arch is its baseline
CONFIGS = [
    ("sd15", "fp32", "ours", "no", [], "baseline: float32, everything resident"),
    ("sd15", "fp32 + GC", "ours", "no", GC, "gradient checkpointing"),
    ("sd15", "bf16 + GC", "ours", "bf16", GC, "bf16 base"),
    ("sd15", "fp16 + GC", "ours", "fp16", GC, "fp16 base, VAE kept float32"),
    ("sd15", "bf16 + GC, no caching", "ours", "bf16", GC + NO_CACHE, "VAE and text encoder every step"),
    ("sd15", "bf16 + GC + 8-bit Adam", "ours", "bf16", GC + ["--use_8bit_adam"], "bitsandbytes' AdamW8bit"),
    ("sd15", "diffusers fp32", "diffusers", "no", [], "train_dreambooth_lora.py"),
    ("sd15", "diffusers bf16 + GC", "diffusers", "bf16", GC, "train_dreambooth_lora.py"),
    ("sdxl", "bf16 + GC", "ours", "bf16", GC, "baseline: bf16 base"),
    ("sdxl", "fp16 + GC", "ours", "fp16", GC, "fp16 base, VAE kept float32"),
    ("sdxl", "bf16 + GC, no caching", "ours", "bf16", GC + NO_CACHE, "VAE and text encoders every step"),
    ("sdxl", "diffusers bf16 + GC", "diffusers", "bf16", GC, "train_dreambooth_lora_sdxl.py"),
]


def child(spec: dict) -> None:
    """One configuration in this fresh process; writes its peaks and last step time to spec['result']."""
    from bench.runs import train_here

    r = train_here(spec["trainer"], spec["argv"], spec["script"])
    last = r["stamps"][-1] - r["stamps"][-2] if len(r["stamps"]) > 1 else None
    Path(spec["result"]).write_text(json.dumps(dict(training=r["rss_at_steps"][-1] if r["rss_at_steps"] else None,
                                                    peak=r["peak_rss"], loaded=r["loaded_rss"],
                                                    steps=len(r["stamps"]), last_step=last)))


def skip_reason(trainer: str, extra: list[str], scripts: Path | None, arch: str) -> str | None:
    if trainer == "diffusers" and (scripts is None or not (scripts / SCRIPTS[arch]).is_file()):
        return f"no {SCRIPTS[arch]} (pass --diffusers_scripts DIR)"
    if "--use_8bit_adam" in extra and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes not installed (it needs a CUDA GPU)"
    return None


def run_one(arch: str, trainer: str, precision: str, extra: list[str], base: str, resolution: int,
            scripts: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="singlora-memory-") as tmp:
        spec = dict(trainer=trainer, script=str(scripts / SCRIPTS[arch]) if trainer == "diffusers" else None,
                    argv=trainer_flags(trainer, base, resolution, 2, f"{tmp}/out", precision, 100) + extra)
        start = time.perf_counter()
        r = in_fresh_process("bench.memory", spec, tmp)
        return r if "error" in r else dict(r, seconds=time.perf_counter() - start)


def table(rows: list[dict]) -> str:
    lines = ["| base | configuration | trainer | peak RSS through step 2 (GB) | x baseline | after loading (GB) "
             "| whole process (GB) | 2nd step (s) | what it shows |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    baseline: dict[str, float] = {}
    for r in rows:
        trainer = "ours" if r["trainer"] == "ours" else "diffusers"
        head = f"| {r['base']} | {r['name']} | {trainer} |"
        if "peak" not in r:
            lines.append(head + f" n/a | n/a | n/a | n/a | n/a | {r.get('skipped') or r.get('error')} |")
            continue
        baseline.setdefault(r["arch"], r["training"])
        loaded = "-" if r["loaded"] is None else f"{r['loaded']:.1f}"
        step = "-" if r["last_step"] is None else f"{r['last_step']:.1f}"
        lines.append(head + f" {r['training']:.1f} | {r['training'] / baseline[r['arch']]:.2f}x | {loaded} "
                            f"| {r['peak']:.1f} | {step} | {r['what']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", choices=["sd15", "sdxl"], default=["sd15", "sdxl"])
    ap.add_argument("--diffusers_scripts", metavar="DIR", help="a folder with copies of diffusers' "
                    "train_dreambooth_lora.py and train_dreambooth_lora_sdxl.py")
    ap.add_argument("--quick", action="store_true", help="tiny:sd15 / tiny:sdxl at 64 px (seconds)")
    ap.add_argument("--json", metavar="PATH", help="also write every row here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    import diffusers
    import torch

    from singlora_diffusion.pipelines import resolve_base

    scripts = Path(args.diffusers_scripts).resolve() if args.diffusers_scripts else None
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    start, rows = time.perf_counter(), []
    for arch in args.arch:
        base = resolve_base(f"{'tiny' if args.quick else 'random'}:{arch}")
        resolution = 64 if args.quick else RESOLUTION[arch]
        for cfg_arch, name, trainer, precision, extra, what in CONFIGS:
            if cfg_arch != arch:
                continue
            row = dict(arch=arch, base=f"{'tiny' if args.quick else 'random'}:{arch} {resolution} px", name=name,
                       trainer=trainer, what=what)
            reason = skip_reason(trainer, extra, scripts, arch)
            row.update(dict(skipped=reason) if reason else run_one(arch, trainer, precision, extra, base, resolution,
                                                                  scripts))
            print(f"  {row['base']:22s} {name:26s} " + (f"{row['training']:.1f} GB" if "peak" in row else
                                                        row.get("skipped") or f"FAILED {row['error']}"), flush=True)
            rows.append(row)
    print("\n" + table(rows))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if any("error" in r and r["trainer"] == "ours" for r in rows):
        sys.exit(1)  # a failed diffusers run is reported, not fatal: it is someone else's script


if __name__ == "__main__":
    main()
