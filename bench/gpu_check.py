"""The GPU check: one run, one JSON and one markdown table, in under 10 minutes on one GPU.

    bench/gpu_check.sh [--out DIR] [--diffusers_scripts DIR]
    bench/gpu_check.sh --dry-run      # the same code path on the CPU with the tiny pipelines (tested)

On random:sd15 at 512 px in fp16 and random:sdxl at 1024 px in bf16 with gradient checkpointing
(the real component configs, random weights, built on the machine):
- training steps/s and peak torch.cuda.max_memory_allocated of our trainer with SingLoRA (also with
  --compile: its first step's time is the compile time) and with
  PEFT LoRA (rank 8, the attn preset), and of diffusers' train_dreambooth_lora.py /
  train_dreambooth_lora_sdxl.py at equal settings (DIR: copies of them; not in the wheel);
- inference latency of the trained SingLoRA adapter unmerged vs merged (merge_singlora);
- evaluation scoring images/s (bench.eval_throughput) next to its models' raw forward;
- the diffusion transformers at full size (SD3.5-medium at 1024 px, FLUX.1-dev at 512 px; random
  weights built in bf16 on the GPU): a SingLoRA and a PEFT LoRA step (rank 16, attn, gradient
  checkpointing, AdamW) — steps/s and peak memory beside bench.dit_memory's prediction for the
  same transformer — and our trainer on tiny:sd3 / tiny:flux with --quantize_base nf4 (the
  bitsandbytes path end to end: load, inject on Linear4bit, train, save).
Every training is a fresh process (its CUDA peak is its own); steps/s = 1 / the median interval
between optimizer steps after the warm-up steps. Without a GPU (the dry run), memory is peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.runs import ROOT, in_fresh_process, trainer_flags

SCRIPTS = {"sd15": "train_dreambooth_lora.py", "sdxl": "train_dreambooth_lora_sdxl.py"}
# arch -> (resolution, precision, gradient checkpointing); the dry run keeps all but the size
PLAN = {"sd15": (512, "fp16", False), "sdxl": (1024, "bf16", True)}
SETTINGS = {"full": dict(prefix="random", resolution=None, warmup=3, steps=10, infer_steps=20, repeats=3),
            "dry": dict(prefix="tiny", resolution=64, warmup=1, steps=2, infer_steps=2, repeats=1)}
# full size: (transformer config, family, resolution, text tokens); the dry run: the tiny pipelines' at 32 px
DITS = {"full": [("sd35-medium", "sd3", 1024, 77 + 77), ("flux-dev", "flux", 512, 512)],
        "dry": [("tiny:sd3", "sd3", 32, 16), ("tiny:flux", "flux", 32, 16)]}
TRAINERS = [("ours singlora", "ours", ["--adapter", "singlora"]), ("ours lora", "ours", ["--adapter", "lora"]),
            # --compile: its first step is the compile time; GPU only (inductor's CPU build of a dry run
            # takes minutes; bench/trainer_throughput.py measures --compile on the CPU)
            ("ours singlora compile", "ours", ["--adapter", "singlora", "--compile", "true"]),
            ("diffusers", "diffusers", [])]


def child(spec: dict) -> None:
    if spec["kind"] == "train":
        from bench.runs import train_here

        result = train_here(spec["trainer"], spec["argv"], spec.get("script"))
    elif spec["kind"] == "dit":
        result = dit_step(spec)
    else:
        result = infer(spec)
    Path(spec["result"]).write_text(json.dumps(result))


def infer(spec: dict) -> dict:
    """Seconds per image (infer_steps steps, batch 1) with the adapter unmerged, then merged into the weights."""
    import torch

    from singlora_diffusion.format import load_adapter
    from singlora_diffusion.generate import render
    from singlora_diffusion.inject import merge_singlora
    from singlora_diffusion.pipelines import DTYPES, load_pipeline, pipeline_components

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(spec["base"], dtype=DTYPES[spec["precision"]], device=device, vae_fp32_if_upcast=True)
    components = pipeline_components(pipe)
    load_adapter(components, spec["adapter"])

    def seconds() -> float:
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()  # render returns PIL images: the GPU work is done when it returns
            render(pipe, "a photo of sks dog", seed=0, steps=spec["infer_steps"], width=spec["resolution"],
                   height=spec["resolution"])
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    render(pipe, "a photo of sks dog", steps=1, width=spec["resolution"], height=spec["resolution"])  # warm-up
    unmerged = seconds()
    for model in components.values():
        merge_singlora(model)
    return dict(unmerged=unmerged, merged=seconds())


def dit_step(spec: dict) -> dict:
    """SingLoRA then LoRA on a fresh copy of one transformer, in one process (CUDA peaks reset between)."""
    import gc

    import torch

    from bench.dit_memory import measure, real_size_transformer
    from singlora_diffusion.pipelines import load_pipeline, resolve_base

    rows = {}
    for adapter in ("singlora", "lora"):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if spec["name"].startswith("tiny:"):
            model = load_pipeline(resolve_base(spec["name"]), dtype=torch.bfloat16).transformer.requires_grad_(False)
        else:
            model = real_size_transformer(spec["name"], "cuda")
        rows[adapter] = measure(model, spec["family"], spec["resolution"], spec["tokens"], adapter,
                                warmup=spec["warmup"], steps=spec["steps"])
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def training_row(r: dict, warmup: int) -> dict:
    if "error" in r:
        return r
    intervals = [b - a for a, b in zip(r["stamps"][warmup - 1:], r["stamps"][warmup:])]
    memory = r["cuda_peak"] if r["cuda_peak"] is not None else r["peak_rss"]
    first = None if r.get("fit_start") is None else r["stamps"][0] - r["fit_start"]
    return dict(steps_per_s=1 / statistics.median(intervals), memory_gb=memory, first_step_s=first,
                memory_kind="cuda max_memory_allocated" if r["cuda_peak"] is not None else "peak RSS")


def evaluation(dry: bool, tmp: str) -> dict:
    path = Path(tmp) / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "bench.eval_throughput", *(["--quick"] if dry else []),
                           "--json", str(path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        return dict(error=proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed")
    rates = json.loads(path.read_text())["images_per_s"]
    median = {name: statistics.median(v) for name, v in rates.items()}
    return dict(images_per_s=median["embed_subject"], raw_forward=median["raw subject forward"],
                ratio=median["embed_subject"] / median["raw subject forward"])


def markdown(report: dict) -> str:
    lines = [f"GPU check: {report['device']}; torch {report['torch']}, diffusers {report['diffusers']}; "
             f"{report['seconds']:.0f} s in all.", "",
             "| base | trainer | steps/s | x ours lora | first step (s) | peak memory (GB) | memory measure |",
             "|---|---|---:|---:|---:|---:|---|"]
    for arch, rows in report["training"].items():
        lora = rows.get("ours lora", {}).get("steps_per_s")
        for name, r in rows.items():
            if "steps_per_s" not in r:
                lines.append(f"| {report['bases'][arch]} | {name} | n/a | n/a | n/a | n/a | {r.get('skipped') or r.get('error')} |")
                continue
            ratio = f"{r['steps_per_s'] / lora:.2f}x" if lora else "n/a"
            first = "n/a" if r.get("first_step_s") is None else f"{r['first_step_s']:.1f}"
            lines.append(f"| {report['bases'][arch]} | {name} | {r['steps_per_s']:.2f} | {ratio} | {first} | "
                         f"{r['memory_gb']:.2f} | {r['memory_kind']} |")
    lines += ["", "| base | SingLoRA unmerged (s/image) | merged (s/image) | unmerged / merged |", "|---|---:|---:|---:|"]
    for arch, r in report["inference"].items():
        lines.append(f"| {report['bases'][arch]} | " + (f"{r['unmerged']:.3f} | {r['merged']:.3f} | "
                                                        f"{r['unmerged'] / r['merged']:.2f}x |" if "merged" in r
                                                        else f"n/a | n/a | {r.get('error')} |"))
    lines += ["", "| transformer (random weights, bf16, GC) | adapter | trainable | steps/s | x lora | peak memory (GB) "
                  "| predicted (GB) | memory measure |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, rows in report["dit"].items():
        lora = rows.get("lora", {}).get("steps_per_s")
        for adapter, r in rows.items():
            lines.append(f"| {name} | {adapter} | " + (
                f"{r['trainable']:,} | {r['steps_per_s']:.2f} | {r['steps_per_s'] / lora:.2f}x | {r['memory_gb']:.2f} | "
                f"{r['predicted_gb']:.2f} | {r['memory_kind']} |" if "steps_per_s" in r and lora
                else f"n/a | n/a | n/a | n/a | n/a | {r.get('error')} |"))
    lines += ["", "| our trainer, --quantize_base nf4 | steps/s | peak memory (GB) | memory measure |", "|---|---:|---:|---|"]
    for base, r in report["quantized"].items():
        lines.append(f"| {base} | " + (f"{r['steps_per_s']:.2f} | {r['memory_gb']:.2f} | {r['memory_kind']} |"
                                      if "steps_per_s" in r else f"n/a | n/a | {r.get('skipped') or r.get('error')} |"))
    e = report["evaluation"]
    lines += ["", "| evaluation | images/s | raw forward images/s | x raw forward |", "|---|---:|---:|---:|",
              "| embed_subject (DINO + CLIP) | " + (f"{e['images_per_s']:.1f} | {e['raw_forward']:.1f} | "
                                                   f"{e['ratio']:.2f}x |" if "ratio" in e else f"n/a | n/a | {e['error']} |")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny pipelines at 64 px on the CPU, 2 timed steps")
    ap.add_argument("--out", default="outputs/gpu_check", help="where gpu_check.json and gpu_check.md go")
    ap.add_argument("--diffusers_scripts", metavar="DIR", help="copies of diffusers' train_dreambooth_lora.py "
                    "and train_dreambooth_lora_sdxl.py")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    import diffusers
    import torch

    from singlora_diffusion.pipelines import resolve_base

    s = SETTINGS["dry" if args.dry_run else "full"]
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry-run to check the code path on the CPU")
    scripts = Path(args.diffusers_scripts).resolve() if args.diffusers_scripts else None
    start, n_steps = time.perf_counter(), s["warmup"] + s["steps"]
    report = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)",
                  torch=torch.__version__, diffusers=diffusers.__version__, settings=s, bases={}, training={},
                  inference={}, dit={}, quantized={})
    with tempfile.TemporaryDirectory(prefix="singlora-gpu-check-") as tmp:
        for arch, (resolution, precision, checkpointing) in PLAN.items():
            resolution = s["resolution"] or resolution
            base = resolve_base(f"{s['prefix']}:{arch}")
            report["bases"][arch] = f"{s['prefix']}:{arch} {resolution} px {precision}" + (" GC" if checkpointing else "")
            rows, adapter = {}, None
            for name, trainer, extra in TRAINERS:
                if trainer == "diffusers" and (scripts is None or not (scripts / SCRIPTS[arch]).is_file()):
                    rows[name] = dict(skipped=f"no {SCRIPTS[arch]} (pass --diffusers_scripts DIR)")
                    continue
                if "--compile" in extra and args.dry_run:
                    rows[name] = dict(skipped="GPU only (inductor's CPU build; bench.trainer_throughput times it)")
                    continue
                out = f"{tmp}/{arch}-{name.replace(' ', '-')}"
                spec = dict(kind="train", trainer=trainer, script=str(scripts / SCRIPTS[arch]) if scripts else None,
                            argv=trainer_flags(trainer, base, resolution, n_steps, out, precision, n_steps,
                                               checkpointing) + extra)
                rows[name] = training_row(in_fresh_process("bench.gpu_check", spec, tmp), s["warmup"])
                print(f"{report['bases'][arch]:32s} {name:14s} {rows[name]}", flush=True)
                if name == "ours singlora":
                    adapter = Path(out) / f"checkpoint-{n_steps}" / "singlora_weights.safetensors"
            report["training"][arch] = rows
            report["inference"][arch] = (in_fresh_process("bench.gpu_check", dict(kind="infer", base=base, adapter=str(adapter),
                                                       precision=precision, resolution=resolution,
                                                       infer_steps=s["infer_steps"], repeats=s["repeats"]), tmp)
                                         if adapter is not None and adapter.is_file() else dict(error="no adapter"))
            print(f"{report['bases'][arch]:32s} inference {report['inference'][arch]}", flush=True)
        for name, family, resolution, tokens in DITS["dry" if args.dry_run else "full"]:
            label = f"{name} {resolution} px"
            rows = in_fresh_process("bench.gpu_check", dict(kind="dit", name=name, family=family, resolution=resolution,
                                                            tokens=tokens, warmup=s["warmup"], steps=s["steps"]), tmp)
            report["dit"][label] = {a: rows for a in ("singlora", "lora")} if "error" in rows else rows
            print(f"{label:32s} {report['dit'][label]}", flush=True)
            base = f"tiny:{family}"
            if not torch.cuda.is_available():
                report["quantized"][base] = dict(skipped="no CUDA device: bitsandbytes quantization is GPU-only")
                continue
            out = f"{tmp}/{family}-nf4"
            spec = dict(kind="train", trainer="ours", argv=trainer_flags("ours", resolve_base(base), 32, n_steps, out,
                                                                         "bf16", n_steps) + ["--quantize_base", "nf4"])
            report["quantized"][base] = training_row(in_fresh_process("bench.gpu_check", spec, tmp), s["warmup"])
            print(f"{base} nf4{'':23s} {report['quantized'][base]}", flush=True)
        report["evaluation"] = evaluation(args.dry_run, tmp)
    report["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print("\n" + markdown(report))
    failed = [n for rows in report["training"].values() for n, r in rows.items() if "error" in r and n != "diffusers"]
    failed += [f"{name} {a}" for name, rows in report["dit"].items() for a, r in rows.items() if "error" in r]
    failed += [base for base, r in report["quantized"].items() if "error" in r]
    if failed or any("error" in r for r in report["inference"].values()) or "error" in report["evaluation"]:
        sys.exit(1)  # a failed diffusers run is reported, not fatal: it is someone else's script


if __name__ == "__main__":
    main()
