"""Adapter sizes on the full-size diffusion transformers, counted on the meta device (no memory, no
weights): per preset, the layers taken and SingLoRA's and LoRA's trainable parameters at one rank.

    python -m bench.dit_counts [--rank 16]     (the table in docs/benchmarks.md)

SingLoRA stores max(d_in, d_out)·r per layer, LoRA (d_in + d_out)·r: exactly half on the square
attention projections, more on the feed-forward layers of "all".
"""
from __future__ import annotations

import argparse

from singlora_diffusion.reference_configs import TRANSFORMER_CONFIGS, meta_transformer
from singlora_diffusion.targets import PRESETS, find_targets


def counts(name: str, rank: int) -> list[tuple[str, int, int, int]]:
    """(preset, layers, SingLoRA parameters, LoRA parameters) of one transformer."""
    model = meta_transformer(name)
    rows = []
    for preset in PRESETS["transformer"]:
        shapes = [model.get_submodule(n).weight.shape for n in find_targets(model, preset, "transformer")]
        rows.append((preset, len(shapes), sum(rank * max(o, i) for o, i in shapes),
                     sum(rank * (o + i) for o, i in shapes)))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    rank = p.parse_args(argv).rank
    print(f"| transformer | parameters | preset | layers | SingLoRA (r={rank}) | LoRA (r={rank}) | SingLoRA / LoRA |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in TRANSFORMER_CONFIGS:
        total = sum(p.numel() for p in meta_transformer(name).parameters())
        for preset, layers, ours, lora in counts(name, rank):
            print(f"| {name} | {total / 1e9:.2f} B | {preset} | {layers} | {ours:,} | {lora:,} | {ours / lora:.3f} |")


if __name__ == "__main__":
    main()
