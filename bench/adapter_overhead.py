"""What does an adapter cost in training? SingLoRA vs PEFT LoRA and DoRA, above the floor.

    .venv/bin/python -m bench.adapter_overhead            # full run, ~6 min on 2 cores
    .venv/bin/python -m bench.adapter_overhead --quick    # tiny model, keeps the script working

An SD-architecture UNet (random init, ~18M parameters) at 256 px (32x32 latents),
batch 2, fp32 on CPU, presets "attn" (to_q, to_k, to_v, to_out.0) and "paper"
(to_q, to_k). Per preset, rank and method: trainable parameters; the median time
of a training step, the methods interleaved in rotating order so that drift of
the machine (heat, other load) hits all alike; memory, each configuration in a
fresh process, as the bytes autograd saves for backward (exact) and as the rise
of peak RSS over the RSS after setup (everything, allocator included).

The floor is the same frozen UNet with no adapter, run forward + backward with
the gradient of every target layer's output (input gradients only, no weight
gradient, no optimizer): the work any adapter on those layers makes the step do.
A method's overhead is its step minus the floor's, paired per repetition. Beside the clock,
the work of one step is counted exactly: matmul FLOPs (torch's FlopCounterMode) and ATen ops
dispatched, each method's above the floor's.
What each column measures is printed under the table. Goals for SingLoRA vs
LoRA: overhead above the floor <= 0.50x, time <= 1.00x, memory <= 1.00x,
parameters 0.50x.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time

import torch
from torch.nn import functional as F

# LoRA first: it is the reference of every ratio. No LoRA+ row: its layers are LoRA's, and its
# optimizer (B's group at another lr) costs what LoRA's does; bench/trainer_throughput.py times it.
METHODS = ("lora", "singlora", "dora")
FLOOR = "floor"  # no adapter: see Trainer
PRESETS = ("attn", "paper")
PRELOAD = ["torch", "diffusers", "peft", "singlora_diffusion"]  # imported once by the fork server
GOALS = {"overhead": 0.50, "time": 1.00, "saved": 1.00, "rss": 1.00, "params": 0.50}

# name -> (UNet size, latent side, batch, tokens); "full" is ~18.2M parameters.
SETTINGS = {
    "full": dict(block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=256,
                 attention_head_dim=8, latent=32, batch=2, tokens=77),
    "quick": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=(2, 4), latent=8, batch=1, tokens=8),
}


def cores() -> int:
    return len(os.sched_getaffinity(0))


def build_unet(s: dict):
    from singlora_diffusion.tiny import sd_unet

    # seed 0: every method adapts the very same base weights; the deepest block without attention, as SD1.5's
    return sd_unet(s["cross_attention_dim"], seed=0, block_out_channels=s["block_out_channels"],
                   layers_per_block=s["layers_per_block"], sample_size=s["latent"],
                   attention_head_dim=s["attention_head_dim"], plain_last=True)


def make_batch(s: dict) -> dict:
    g = torch.Generator().manual_seed(1)
    b, side = s["batch"], s["latent"]
    return dict(sample=torch.randn(b, 4, side, side, generator=g),
                timestep=torch.randint(0, 1000, (b,), generator=g),
                encoder_hidden_states=torch.randn(b, s["tokens"], s["cross_attention_dim"], generator=g),
                target=torch.randn(b, 4, side, side, generator=g))


def _needs_grad(module, inputs, output):
    # A frozen layer fed by frozen layers gives a tensor without grad; marking it makes backward
    # reach it, as an adapter's parameters would. Downstream of one, outputs need grad already.
    return output if output.requires_grad else output.requires_grad_()


class Trainer:
    """One UNet with one adapter and its optimizer, set up as a trainer would; or the floor."""

    def __init__(self, method: str, rank: int, s: dict, preset: str = "attn"):
        from singlora_diffusion import AdapterConfig
        from singlora_diffusion.inject import attach_ramp
        from singlora_diffusion.pipelines import inject_adapters
        from singlora_diffusion.targets import find_targets

        self.unet = build_unet(s).train()
        self.batch = make_batch(s)
        if method == FLOOR:
            self.unet.requires_grad_(False)
            for name in find_targets(self.unet, preset, "unet"):
                self.unet.get_submodule(name).register_forward_hook(_needs_grad)
            self.params, self.opt = 0, None
            return
        # ramp_up_steps=0: u(t) = 1, the adapter is fully active from the first step.
        inject_adapters({"unet": self.unet}, AdapterConfig(adapter=method, rank=rank, target_modules=preset),
                        ramp_up_steps=0)
        trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.params = sum(p.numel() for p in trainable)
        self.opt = torch.optim.AdamW(trainable, lr=1e-4)
        if method == "singlora":
            attach_ramp(self.opt, self.unet)  # part of SingLoRA's real training step (see training/loop.py)

    def step(self) -> None:
        b = self.batch
        pred = self.unet(b["sample"], b["timestep"], encoder_hidden_states=b["encoder_hidden_states"]).sample
        F.mse_loss(pred, b["target"]).backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def saved_for_backward(trainer: Trainer) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one step.

    Deduplicated by storage (a layer input saved by both the base Linear and the
    adapter is one tensor in memory) and without the model's own parameters and
    buffers, which are resident anyway.
    """
    resident = {t.untyped_storage().data_ptr() for t in [*trainer.unet.parameters(), *trainer.unet.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.step()
    return sum(saved.values())


def work_per_step(trainer: Trainer) -> dict:
    """What one step dispatches, exactly (no clock): matmul/conv/attention FLOPs (torch's own
    FlopCounterMode) and the number of ATen ops, each a kernel launch with its dispatch cost."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class CountOps(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.ops += 1
            return func(*args, **(kwargs or {}))

    with FlopCounterMode(display=False) as flops, CountOps():
        trainer.step()
    return dict(flops=flops.get_total_flops(), ops=CountOps.ops)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(method: str, rank: int, s: dict, preset: str) -> dict:
    """Runs in a fresh process so no other configuration's allocations blur the peak."""
    torch.set_num_threads(cores())
    trainer = Trainer(method, rank, s, preset)
    rss_setup = rss_bytes()
    peak_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    saved = saved_for_backward(trainer)  # the first step also allocates grads and AdamW state
    for _ in range(2):
        trainer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # If setup peaked higher than training, ru_maxrss did not move and the increase is unknown.
    return dict(saved=saved, rss=peak - rss_setup if peak > peak_setup else None, **work_per_step(trainer))


def time_steps(trainers: dict[str, Trainer], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Per method, `repeats` step times; each repetition runs every method once, in rotating order."""
    times = {m: [] for m in trainers}
    order = list(trainers)
    for rep in range(warmup + repeats):
        k = rep % len(order)
        for m in order[k:] + order[:k]:
            start = time.perf_counter()
            trainers[m].step()
            if rep >= warmup:
                times[m].append(time.perf_counter() - start)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    return tuple(statistics.quantiles(values, n=4)) if len(values) > 1 else (values[0],) * 3


def paired_ratio(times: list[float], ref: list[float]) -> dict:
    """Median and interquartile range of the per-repetition ratios: how big the noise is."""
    q1, q2, q3 = quartiles([t / r for t, r in zip(times, ref)])
    return dict(time_ratio=q2, time_ratio_iqr=(q1, q3))


def overhead(times: list[float], floor: list[float]) -> dict:
    """The step above the floor: median and interquartile range of the per-repetition differences."""
    q1, q2, q3 = quartiles([t - f for t, f in zip(times, floor)])
    return dict(overhead=q2, overhead_iqr=(q1, q3))


def run(ranks: list[int], repeats: int, warmup: int, s: dict, presets=PRESETS) -> list[dict]:
    # A fork server that has imported the libraries but run nothing: each memory
    # child starts clean and fast. Plain fork would copy this process's heap and
    # its OpenMP threads.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    rows = []
    with ctx.Pool(1, maxtasksperchild=1) as pool:  # one process per configuration
        for preset in presets:
            for rank in ranks:
                methods = (FLOOR, *METHODS)  # the floor is timed in every round: the overheads pair with it
                # Memory first and one at a time: a child running beside the timing would skew it.
                memory = {m: pool.apply(measure_memory, (m, rank, s, preset)) for m in methods}
                trainers = {m: Trainer(m, rank, s, preset) for m in methods}
                times = time_steps(trainers, repeats, warmup)
                for m in methods:
                    rows.append(dict(preset=preset, rank=rank, method=m, params=trainers[m].params, **memory[m],
                                     times=times[m], time=statistics.median(times[m]),
                                     **paired_ratio(times[m], times["lora"]), **overhead(times[m], times[FLOOR])))
                del trainers
    return rows


def ratios(row: dict, rows: list[dict]) -> dict[str, float | None]:
    """row / LoRA of the same preset and rank for each quantity with a goal (time: the paired median;
    overhead: the ratio of the two median overheads above the floor), and for the work above the
    floor (flops, ops: exact counts, no clock)."""
    find = lambda m: next(r for r in rows if (r["preset"], r["rank"], r["method"]) == (row["preset"], row["rank"], m))
    ref, floor = find("lora"), find(FLOOR)
    out = {k: None if row[k] is None or not ref[k] else row[k] / ref[k]
           for k in ("params", "saved", "rss", "overhead")}
    above = {k: (row[k] - floor[k]) / (ref[k] - floor[k]) if ref[k] != floor[k] else None for k in ("flops", "ops")}
    return dict(out, **above, time=row["time_ratio"])


def fmt(value: float | None, spec: str = ".2f", unit: str = "x") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def table(rows: list[dict]) -> str:
    lines = ["| preset | rank | method | trainable params | x LoRA | median step (s) | x LoRA "
             "| above floor (ms) | x LoRA | matmul GFLOP above floor | x LoRA | ATen ops above floor | x LoRA "
             "| saved for backward (MB) | x LoRA | peak RSS increase (MB) | x LoRA |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    floors = {(r["preset"], r["rank"]): r for r in rows if r["method"] == FLOOR}
    for row in rows:
        x, (lo, hi) = ratios(row, rows), row["time_ratio_iqr"]
        mb = {k: None if row[k] is None else row[k] / 2**20 for k in ("saved", "rss")}
        olo, ohi = (1000 * v for v in row["overhead_iqr"])
        is_floor, floor = row["method"] == FLOOR, floors[row["preset"], row["rank"]]
        above = "-" if is_floor else f"{1000 * row['overhead']:.1f} [{olo:.1f}, {ohi:.1f}]"
        # the floor's row gives its own totals; the others what they add to them
        flops = row["flops"] - (0 if is_floor else floor["flops"])
        ops = row["ops"] - (0 if is_floor else floor["ops"])
        dash = lambda v: "-" if is_floor else fmt(v)
        lines.append(f"| {row['preset']} | {row['rank']} | {row['method']} | {row['params']:,} | {fmt(x['params'])} "
                     f"| {row['time']:.3f} | {fmt(x['time'])} [{lo:.2f}, {hi:.2f}] | {above} | {dash(x['overhead'])} "
                     f"| {'(total) ' if is_floor else ''}{flops / 1e9:.3f} | {dash(x['flops'])} "
                     f"| {'(total) ' if is_floor else ''}{ops:,} | {dash(x['ops'])} | {fmt(mb['saved'], '.1f', '')} "
                     f"| {fmt(x['saved'])} | {fmt(mb['rss'], '.1f', '')} | {fmt(x['rss'])} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        if row["method"] == "singlora":
            x = ratios(row, rows)
            # Judged as printed, to 2 decimals; a missing measurement never passes.
            parts = [f"{key} {fmt(x[key])} ({'meets' if x[key] is not None and round(x[key], 2) <= goal else 'MISSES'}"
                     f" <= {goal:.2f}x)" for key, goal in GOALS.items()]
            out.append(f"{row['preset']} rank {row['rank']}: SingLoRA " + ", ".join(parts)
                       + f"; at equal work: matmul FLOPs above the floor {fmt(x['flops'])}, ATen ops {fmt(x['ops'])}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per method (default 40; quick: 3)")
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help="default 8 16; quick: 4")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS, help="default: attn paper")
    ap.add_argument("--quick", action="store_true", help="tiny UNet, ~15 s with imports: keeps the script working")
    ap.add_argument("--json", metavar="PATH", help="also write settings and results here")
    args = ap.parse_args(argv)
    s = SETTINGS["quick" if args.quick else "full"]
    ranks = args.ranks or ([4] if args.quick else [8, 16])
    repeats = args.repeats or (3 if args.quick else 40)
    warmup = 1 if args.quick else 3
    torch.set_num_threads(cores())
    torch.manual_seed(0)

    base = sum(p.numel() for p in build_unet(s).parameters())
    print(f"UNet2DConditionModel, {base / 1e6:.2f}M parameters, random init; latents {s['latent']}x{s['latent']} "
          f"(= {8 * s['latent']} px), batch {s['batch']}, {s['tokens']} text tokens, fp32, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"targets: presets {', '.join(args.presets)} (attn: to_q, to_k, to_v, to_out.0; paper: to_q, to_k); "
          f"ranks {ranks}; alpha = rank; "
          f"{warmup} warm-up + {repeats} timed steps per method, interleaved in rotating order\n")
    start = time.perf_counter()
    rows = run(ranks, repeats, warmup, s, args.presets)
    print(table(rows))
    print("\nstep = forward + MSE loss + backward + AdamW step; time x LoRA = median of the paired per-repetition\n"
          "  ratios method/LoRA, [interquartile range].\n"
          "floor = the frozen UNet without adapter, forward + backward with the gradient of every target layer's\n"
          "  output (input gradients only). above floor = median [IQR] of the per-repetition step - floor;\n"
          "  x LoRA = the method's median overhead / LoRA's.\n"
          "matmul GFLOP, ATen ops = exact counts for one step (torch's FlopCounterMode: matmuls, convolutions,\n"
          "  attention; every ATen op dispatched, each a kernel with its launch cost), above the floor's.\n"
          "saved for backward = bytes of the distinct storages autograd keeps for backward in one step,\n"
          "  parameters excluded (the activation memory).\n"
          "peak RSS increase = peak RSS over 3 training steps minus RSS after model+optimizer setup, each\n"
          "  configuration in a fresh process (grads, AdamW state, activations and allocator slack).")
    print("\nGoals for SingLoRA vs LoRA: overhead above the floor <= 0.50x, time <= 1.00x, memory <= 1.00x,\n"
          "  parameters 0.50x\n"
          "  (0.50x is exact for square layers only: SingLoRA stores max(d_in, d_out)*r, LoRA (d_in + d_out)*r).")
    print("\n".join(verdicts(rows)))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(settings=dict(s, base_params=base, ranks=ranks, repeats=repeats, warmup=warmup,
                                         threads=torch.get_num_threads(), torch=torch.__version__,
                                         machine=platform.machine()), goals=GOALS, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
