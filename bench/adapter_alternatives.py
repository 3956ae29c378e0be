"""Where SingLoRA's training overhead goes, and the two ways tried to halve it (neither kept).

    .venv/bin/python -m bench.adapter_alternatives            # ~2 min on 2 cores
    .venv/bin/python -m bench.adapter_alternatives --quick    # seconds: keeps the script working

bench/adapter_overhead.py counts the work above the floor exactly: at equal rank SingLoRA's
matmul FLOPs are LoRA's (1.00x; both are x·(d_in×r)·(r×d_out)), its ATen ops 0.80x. So the time
above the floor can only fall by doing those matmuls faster or in fewer calls. Measured here at
the shapes of that bench's UNet (256 px, batch 2: M rows of d features), fp32 on the CPU:

1. The thin matmuls themselves: a product whose output has r <= 8 columns (x·A forward,
   xᵀ·g for the weight gradient) takes the BLAS's slow path; the same product computed
   transposed (output of r rows) does not, but is the slower one from r = 16.
2. One self-attention's q, k, v layers (one input, three adapters), overhead above the frozen
   layers' input-gradient floor, for PEFT's LoRA layer, SingLoRA as built, SingLoRA with every
   matmul laid out with r rows of output (an autograd.Function, defined here only), and
   SingLoRA with one down-projection x·[A_q A_k A_v] for the three layers (one matmul, split).

Times are the median of 7 blocks of repeated calls; x SingLoRA < 1 means faster than as built.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

# (M rows, d features): the UNet's self-attention levels at 256 px, batch 2 (32², 16², 8² latents)
SHAPES = {"full": [(2048, 64), (512, 128), (128, 256)], "quick": [(64, 16)]}
RANKS = {"full": [4, 8, 16], "quick": [4]}


def median_us(fn, calls: int, blocks: int = 7) -> float:
    for _ in range(max(2, calls // 5)):
        fn()
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


class RowsOut(torch.autograd.Function):
    """x·P·Qᵀ with each of its six matmuls (2 forward, 4 backward) computed so that its output
    has r rows, not r columns. The experiment of table 2; not used by the library."""

    @staticmethod
    def forward(ctx, x, P, Q):
        x2 = x.reshape(-1, x.shape[-1])
        hT = P.t() @ x2.t()  # (r, M)
        ctx.save_for_backward(x2, hT, P, Q)
        return (hT.t() @ Q.t()).view(*x.shape[:-1], Q.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, hT, P, Q = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gT = Q.t() @ g2.t()  # (r, M) = (g·Q)ᵀ
        return (gT.t() @ P.t()).view(*g.shape[:-1], P.shape[0]), (gT @ x2).t(), (hT @ g2).t()


def thin_matmuls(shapes, ranks, calls) -> list[str]:
    lines = ["| M | d | r | x·A (us) | as (Aᵀ·xᵀ)ᵀ | x | xᵀ·g (us) | as (gᵀ·x)ᵀ | x |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, d in shapes:
        for r in ranks:
            x, A, g = torch.randn(m, d), torch.randn(d, r), torch.randn(m, r)
            a, b = median_us(lambda: x @ A, calls), median_us(lambda: (A.t() @ x.t()).t(), calls)
            c, e = median_us(lambda: x.t() @ g, calls), median_us(lambda: (g.t() @ x).t(), calls)
            lines.append(f"| {m} | {d} | {r} | {a:.0f} | {b:.0f} | {b / a:.2f}x | {c:.0f} | {e:.0f} | {e / c:.2f}x |")
    return lines


def qkv(d: int, rank: int, method: str) -> nn.Module:
    """Three frozen d×d Linears on one input, summed, with `method`'s adapters (none for "floor")."""
    from singlora_diffusion.layer import SingLoRALinear

    torch.manual_seed(0)
    names = ("to_q", "to_k", "to_v")
    layers = nn.ModuleDict({n: nn.Linear(d, d).requires_grad_(False) for n in names})
    if method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(names)), layers)
        for n in names:  # B = 0 at init: give it values, as after a step (zero is no faster)
            nn.init.normal_(layers[n].lora_B["default"].weight, std=0.01)
    elif method != "floor":
        for n in names:
            layers[n] = SingLoRALinear(layers[n], rank)
    As = [layers[n].singlora_A for n in names] if method.startswith("singlora") else []
    bases = [layers[n].base_layer for n in names] if As else []

    def forward(x):
        if method == "singlora rows-out":
            return sum(b(x) + RowsOut.apply(x, A, A) for b, A in zip(bases, As))
        if method == "singlora fused down":
            h = x @ torch.cat(As, 1)
            return sum(b(x) + hi @ A.t() for b, A, hi in zip(bases, As, h.split(rank, -1)))
        return sum(layers[n](x) for n in names)

    module = nn.Module()
    module.layers, module.forward = layers, forward
    return module


METHODS = ("floor", "lora", "singlora", "singlora rows-out", "singlora fused down")


def qkv_overhead(shapes, ranks, calls) -> list[str]:
    lines = ["| M | d | r | LoRA (us) | SingLoRA (us) | x LoRA | rows-out (us) | x SingLoRA | fused down (us) "
             "| x SingLoRA |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, d in shapes:
        for r in ranks:
            x0 = torch.randn(2, m // 2, d)
            us = {}
            for method in METHODS:
                model = qkv(d, r, method)

                def step():
                    x = x0.clone().requires_grad_()
                    model.forward(x).sum().backward()

                us[method] = median_us(step, calls)
            o = {k: v - us["floor"] for k, v in us.items()}
            lines.append(f"| {m} | {d} | {r} | {o['lora']:.0f} | {o['singlora']:.0f} | {o['singlora'] / o['lora']:.2f}x "
                         f"| {o['singlora rows-out']:.0f} | {o['singlora rows-out'] / o['singlora']:.2f}x "
                         f"| {o['singlora fused down']:.0f} | {o['singlora fused down'] / o['singlora']:.2f}x |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one tiny shape, few calls")
    args = ap.parse_args(argv)
    size = "quick" if args.quick else "full"
    shapes, ranks, calls = SHAPES[size], RANKS[size], 5 if args.quick else 100
    print(f"fp32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("Table 1: the thin matmuls (us per call)\n")
    print("\n".join(thin_matmuls(shapes, ranks, calls)))
    print("\nTable 2: one self-attention's q, k, v adapters, forward + backward above the frozen layers "
          "(us per step)\n")
    print("\n".join(qkv_overhead(shapes, ranks, calls)))


if __name__ == "__main__":
    main()
