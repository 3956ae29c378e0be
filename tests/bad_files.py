"""Adapter files a hostile or unlucky user hands us: each is refused, with the line that names why.

Built from a real adapter (and its kohya export) by changing one thing, so a file
that passes a check it should fail differs from a good file in exactly that.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from singlora_diffusion.export import export_kohya

# name -> a fragment of the one line that refuses it
SINGLORA = {
    "nan": "NaN/Inf values",
    "alpha_nan": "metadata alpha='nan'",
    "alpha_zero": "metadata alpha='0.0'",
    "rank_lie": "but the metadata (rank 8",
    "rank0": "metadata rank='0'",
    "shape_lie": "but the metadata (rank 4, module_shapes",
    "shape_missing": "has no module_shapes entry",
    "wrong_arch": "keys fit no layer of this base",
    "empty": "holds no adapter tensors",
}
LORA = {
    "kohya_nan": "NaN/Inf values",
    "kohya_alpha_nan": ".alpha = [nan]",
    "kohya_empty": "holds no LoRA modules",
    "kohya_partial": "of its 108 LoRA modules fit a layer",
}
PARTIAL = ("wrong_arch", "kohya_partial")  # load with --allow_partial


def write_bad_files(good: Path, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    t = load_file(str(good))
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    shapes = json.loads(meta["module_shapes"])
    first = next(iter(t))
    square = next(k for k, (d_out, d_in) in shapes.items() if d_out == d_in == 32)  # to_k in the first block

    def put(name, tensors, metadata):
        save_file(tensors, str(out / f"{name}.safetensors"), metadata=metadata)

    put("nan", {**t, first: torch.full_like(t[first], float("nan"))}, meta)
    put("alpha_nan", t, {**meta, "alpha": "nan"})
    put("alpha_zero", t, {**meta, "alpha": "0.0"})
    put("rank_lie", t, {**meta, "rank": str(2 * int(meta["rank"]))})
    put("rank0", t, {**meta, "rank": "0"})
    put("shape_lie", t, {**meta, "module_shapes": json.dumps({**shapes, square: [32, 64]})})
    put("shape_missing", t, {**meta, "module_shapes": json.dumps({k: v for k, v in shapes.items() if k != square})})
    rename = lambda k: k.replace("attn1", "attn9")  # noqa: E731 - a module no SD UNet has
    put("wrong_arch", {rename(k): v for k, v in t.items()},
        {**meta, "module_shapes": json.dumps({rename(k): v for k, v in shapes.items()})})
    put("empty", {}, meta)

    kohya = export_kohya(good, out / "kohya.safetensors")
    kt = load_file(str(kohya))
    with safe_open(str(kohya), "pt") as f:
        kmeta = f.metadata()
    up = next(k for k in kt if k.endswith("lora_up.weight"))
    alpha = next(k for k in kt if k.endswith(".alpha"))
    put("kohya_nan", {**kt, up: torch.full_like(kt[up], float("inf"))}, kmeta)
    put("kohya_alpha_nan", {**kt, alpha: torch.tensor(float("nan"))}, kmeta)
    put("kohya_empty", {}, kmeta)
    put("kohya_partial", {k.replace("lora_unet_down_blocks", "lora_unet_side_blocks"): v for k, v in kt.items()}, kmeta)
    return {name: out / f"{name}.safetensors" for name in (*SINGLORA, *LORA, "kohya")}
