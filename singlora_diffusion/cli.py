"""`singlora` console script (also `python -m singlora_diffusion`)."""
from __future__ import annotations

import argparse
import json
import sys


def _tiny(args):
    from .errors import BadInput
    from .tiny import save_random_pipeline, save_tiny_pipeline

    if args.full_size and args.arch not in ("sd15", "sdxl"):
        raise BadInput(f"--full_size builds sd15 or sdxl; a full-size {args.arch} (billions of random weights) is "
                       f"not built: count its layers on the meta device instead (docs/benchmarks.md)")
    save, kind = (save_random_pipeline, "full-size") if args.full_size else (save_tiny_pipeline, "tiny")
    print(f"{kind} {args.arch} pipeline (random weights) written to {save(args.out_dir, args.arch, args.seed)}")


def _inspect(args):
    from .layouts import describe, detect_layout

    layout = detect_layout(args.adapter)
    print(f"file: {layout.path}")
    if layout.native is not None:  # the native file's own metadata and parameter counts first
        adapter = layout.native
        for key, value in adapter.metadata.items():
            if key != "module_shapes":
                print(f"  {key}: {value}")
        counts: dict[str, list[int]] = {}
        for key, A in adapter.tensors.items():
            c = counts.setdefault(key.partition(".")[0], [0, 0])
            c[0] += 1
            c[1] += A.numel()
        for component, (modules, params) in counts.items():
            print(f"  {component}: {modules} modules, {params:,} parameters")
        print(f"  total: {sum(c[1] for c in counts.values()):,} parameters")
    for label, value in describe(layout).items():
        print(f"  {label}: {value}")


def _import(args):
    from .layouts import import_file

    done = import_file(args.file, args.base, args.out, rank=args.rank, alpha=args.alpha, step=args.step,
                       ramp_up_steps=args.ramp_up_steps, allow_partial=args.allow_partial)
    for note in done.settings.notes:
        print(f"{args.file}: {note}", file=sys.stderr)
    if done.skipped:
        total = done.loaded + len(done.skipped)
        print(f"{args.file}: partial import: {done.loaded} of {total} modules fit this base; "
              f"{len(done.skipped)} skipped, e.g. {done.skipped[0]}", file=sys.stderr)
    s = done.settings
    print(f"imported {done.layout.name} ({done.loaded} modules, rank {s.rank}, alpha {s.alpha:g}, "
          f"step {s.step} of {s.ramp_up_steps}: u = {s.u:g}) to {done.out}")


def _export(args):
    from .export import export_diffusers, export_kohya

    path = export_diffusers(args.adapter, args.out) if args.to == "diffusers" else export_kohya(args.adapter, args.out)
    print(f"wrote {path}")


def _merge(args):
    from .errors import BadInput
    from .export import merge_into_pipeline, merge_to_single_file
    from .pipelines import DTYPES

    if args.dtype and args.save_precision and args.dtype != args.save_precision:
        raise BadInput(f"--dtype {args.dtype} and --save_precision {args.save_precision} disagree; give one")
    # a folder keeps full precision unless asked; a single file is what A1111 / ComfyUI users share: fp16
    precision = args.dtype or args.save_precision or ("fp16" if args.single_file else "fp32")
    dtype = DTYPES["no" if precision == "fp32" else precision]

    def log(line):
        print(line, file=sys.stderr)

    if args.single_file:
        out = merge_to_single_file(args.base, args.adapter, args.single_file, args.scale, dtype, args.allow_partial, log)
        print(f"merged checkpoint ({precision}) written to {out}")
        return
    out = merge_into_pipeline(args.base, args.adapter, args.out, args.scale, dtype, args.allow_partial, log)
    print(f"merged pipeline written to {out}")


def _generate(args):
    from .adapters import apply_adapter, check_adapter_file
    from .generate import render
    from .pipelines import check_base_exists, inference_dtype, load_pipeline

    check_base_exists(args.base)
    if args.adapter:
        check_adapter_file(args.adapter)  # a wrong path or a bad file fails before the base model loads
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.base, dtype=inference_dtype(device), device=device, vae_fp32_if_upcast=True)
    if args.adapter:
        note = apply_adapter(pipe, args.adapter, args.scale, args.allow_partial).note
        if note:
            print(f"{args.adapter}: {note}", file=sys.stderr)
    image = render(pipe, args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                   negative_prompt=args.negative_prompt, width=args.width, height=args.height)[0]
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps({k: v for k, v in vars(args).items() if k != "func"}))
    image.save(args.out, pnginfo=info)
    print(f"wrote {args.out}")


def _grid(args):
    from .grid import main as grid_main

    code = grid_main(args.plan, args.out, args.dry_run, args.table, args.gpu_check)
    if code:
        raise SystemExit(code)


def _webui(args):
    from .webui.app import main as webui_main

    webui_main(args.webui_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="singlora", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("tiny-pipeline", help="build a small random-weight pipeline offline (SD1.5, SDXL, SD3, Flux.1)")
    s.add_argument("out_dir")
    s.add_argument("--arch", choices=["sd15", "sdxl", "sd3", "flux"], default="sd15")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--full_size", action="store_true",
                   help="the real SD1.5 / SDXL component configs (2 GB / 6.5 GB in fp16), as random:sd15 / random:sdxl")
    s.set_defaults(func=_tiny)

    s = sub.add_parser("inspect", help="print an adapter file's layout (ours, SimpleTuner / peft-singlora, "
                                       "diffusers, kohya, PEFT LoRA), rank, alpha, targets, step and base")
    s.add_argument("adapter")
    s.set_defaults(func=_inspect)

    s = sub.add_parser("import", help="convert a SingLoRA file of another tool (SimpleTuner, peft-singlora) "
                                      "to the native format")
    s.add_argument("file", help="a .safetensors file (see `singlora inspect FILE` for its layout)")
    s.add_argument("--base", required=True, help="the base it was trained on: its layers' shapes split each matrix")
    s.add_argument("--out", required=True, help="the native .safetensors file to write")
    s.add_argument("--rank", type=int, help="r, when the file's metadata lacks it")
    s.add_argument("--alpha", type=float, help="alpha, when the file's metadata lacks it (overrides it)")
    s.add_argument("--step", type=int, help="the ramp step t (default: the file's step buffer, else T: u = 1)")
    s.add_argument("--ramp_up_steps", type=int, help="the ramp length T (default 1000, peft-singlora's)")
    s.add_argument("--allow_partial", action="store_true",
                   help="import a file whose keys fit this base only in part (the counts are printed)")
    s.set_defaults(func=_import)

    s = sub.add_parser("export", help="convert a SingLoRA file to a standard LoRA file")
    s.add_argument("adapter")
    s.add_argument("--to", choices=["diffusers", "kohya"], required=True)
    s.add_argument("out", help="diffusers: an output folder; kohya: an output .safetensors file")
    s.set_defaults(func=_export)

    s = sub.add_parser("merge", help="fold the adapter into the base: a diffusers folder or one checkpoint file")
    s.add_argument("--base", required=True, help="hub id or local diffusers folder")
    s.add_argument("--adapter", required=True)
    out = s.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="a diffusers pipeline folder (diffusers, ComfyUI's diffusers loader)")
    out.add_argument("--single_file", metavar="OUT.safetensors",
                     help="one checkpoint in the original SD1.x / SDXL layout (A1111, Forge, ComfyUI's checkpoint loader)")
    s.add_argument("--scale", type=float, default=1.0)
    s.add_argument("--allow_partial", action="store_true",
                   help="merge an adapter whose keys fit this base only in part (the counts are printed)")
    s.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                   help="dtype of the saved weights; default fp16 for --single_file, fp32 for --out")
    s.add_argument("--save_precision", choices=["fp32", "fp16", "bf16"],
                   help="the same as --dtype (kohya's name); fp16 halves an SDXL folder to ~7 GB")
    s.set_defaults(func=_merge)

    s = sub.add_parser("generate", help="render an image, with or without an adapter")
    s.add_argument("--base", required=True, help="hub id or local diffusers folder")
    s.add_argument("--adapter", help="SingLoRA file, diffusers/kohya LoRA file, or a training output folder")
    s.add_argument("--scale", type=float, default=1.0, help="adapter strength")
    s.add_argument("--allow_partial", action="store_true",
                   help="load an adapter whose keys fit this base only in part (the counts are printed)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative_prompt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=7.5)
    s.add_argument("--width", type=int)
    s.add_argument("--height", type=int)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_generate)

    s = sub.add_parser("grid", help="the DreamBench grid subjects x methods x seeds from a YAML plan (the paper's "
                                     "Table 3: grid_paper_table3): train, evaluate, table; resumable; run it in N "
                                     "processes (accelerate launch, or machines sharing --out) to share the cells")
    s.add_argument("plan", help="a plan YAML, or a shipped one: grid_paper_table3, grid_toy")
    s.add_argument("--out", help="folder of the cells and the table (the same for every process)")
    s.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the runs, images and estimated GPU time; run nothing")
    s.add_argument("--table", action="store_true", help="write the table from the cells finished so far; run nothing")
    s.add_argument("--gpu_check", help="gpu_check.json whose measured rates --dry-run uses "
                                       "(default outputs/gpu_check/gpu_check.json when present)")
    s.set_defaults(func=_grid)

    s = sub.add_parser("webui", help="the Gradio web UI (same flags as webui/app.py)", add_help=False)
    s.add_argument("webui_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=_webui)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import UserError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        # User mistakes get one readable line; anything else (CUDA out of memory, a bug) keeps its traceback.
        print(f"singlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
