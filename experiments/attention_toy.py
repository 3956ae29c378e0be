"""SingLoRA vs LoRA on the paper's attention toy problem (arXiv 2507.05566, Sec. 5 / Fig. 1).

    OMP_NUM_THREADS=1 .venv/bin/python -m experiments.attention_toy          # full run
    OMP_NUM_THREADS=1 .venv/bin/python -m experiments.attention_toy --quick  # ~30 s smoke version

Frozen random Wq0, Wk0 (d×d); learn a target score matrix Z from inputs X (N×d) by
minimising mean((X Wqᵀ Wk Xᵀ − Z)²) with AdamW. Weights are in PyTorch's (d_out, d_in)
layout (Q = X·Wqᵀ, as nn.Linear computes it); the paper's X·Wq·Wkᵀ·Xᵀ is the same thing
with its W = ours transposed. Updates, with the same trainable-parameter count:
  LoRA     (rank r_l):   ΔW = (α/r)·B·A,        A (r×d) Kaiming(a=√5) as PEFT, B = 0
  SingLoRA (rank 2·r_l): ΔW = (α/r)·u(t)·A·Aᵀ,  A (d×r) from layer.init_singlora_A,
                         u(t) = layer.ramp(t, T), t = completed optimizer steps
with α = r (scale 1) for both; LoRA has no ramp.

The paper does not say how X and Z are drawn, so three target families are run:
  random:   Z i.i.d. Gaussian with the entry std of X Wq0ᵀ Wk0 Xᵀ (reachable by neither),
  lora:     Z from Wq0 + Bq*·Aq*, Wk0 + Bk*·Ak* with rank-r_l factors (reachable by LoRA),
  singlora: Z from Wq0 + Sq·Sqᵀ, Wk0 + Sk·Skᵀ with Sq, Sk (d×2r_l) (reachable by SingLoRA).
Scales (chosen so scores and losses are O(1)): X entries N(0, d^-1/2) (std d^-1/4),
W0 entries N(0, 1/d) (singular values ≤ ~2), target factor entries N(0, 1/d) (each
rank-1 term of a target update has norm ~1: ‖ΔW*‖_F ≈ 2-3 against ‖W0‖_F ≈ 11, a large
fine-tuning step that adapter entries of the init's size can still reach). Then the
scores X Wq0ᵀ Wk0 Xᵀ have entry std ~1 and the MSE at ΔW = 0 is ~2 (random), ~0.06
(lora), ~0.13 (singlora).
N = rows = d = 128: in the form used for training the cost of a step does not depend
on N at all (only the ~200 exact loss evaluations do), so there was no reason to shrink it.

Speed. (1) All (family, seed) problems are rows of one batch and the learning rates of
the sweep a further axis, parameters (S, d, L, r), products batched (bmm). AdamW is
elementwise and the loss is the *sum* over runs, so each run gets exactly the update of
a separate run (tests/test_attention_toy.py checks). (2) With Wqᵀ·Wk − Wq0ᵀ·Wk0 = Ũ·Ṽᵀ
(width 2r, see `low_rank`) and R0 = X·Wq0ᵀ·Wk0·Xᵀ − Z, the loss is ‖R0 + X·Ũ·Ṽᵀ·Xᵀ‖²;
training differentiates `surrogate`, its exact expansion through G = XᵀX and C = XᵀR0X,
so no N×N or d×d×d product is formed in the loop. Reported losses always come from the
explicit residual. About 7 ms per step per method on one core for 60 runs (d = 128);
the full default run took ~7 min.

Outcome of the full run (results/attention_toy.json): each method wins by orders of
magnitude on targets of its own shape and loses on the other's; on random targets both
plateau and SingLoRA's plateau is lower (its update has rank 2r_l per matrix for the
same parameter count). The paper's picture (SingLoRA ~1e-5, LoRA ~1e-2) is reproduced
only when the target has SingLoRA's shape.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from singlora_diffusion.layer import init_singlora_A, ramp

FAMILIES = ("random", "lora", "singlora")  # index fixes each family's RNG stream
METHODS = ("lora", "singlora")
ADAMW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)  # the trainer's defaults
QUICK = dict(seeds=3, iters=1500, lr_sweep="1e-4,1e-2", sweep_seeds=2)


def gen(seed: int, stream: int) -> torch.Generator:
    """One generator per (seed, purpose): a row's data never depends on which other
    rows share the batch, so batched and separate runs see identical problems."""
    return torch.Generator().manual_seed(1000 * int(seed) + stream)


KEYS = ("X", "R0", "Wq0T", "Wk0T", "G", "C")


def make_problem(family: str, seeds, dim: int = 128, rows: int = 128, lora_rank: int = 4) -> dict:
    """Batched precomputed problem, each (S, ·, ·): X, R0 = X·Wq0ᵀ·Wk0·Xᵀ − Z (residual at
    ΔW = 0), Wq0ᵀ, Wk0ᵀ, and for `surrogate` G = Xᵀ·X and C = Xᵀ·R0·X (d×d)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    out = {k: [] for k in KEYS}
    for s in seeds:
        g = gen(s, FAMILIES.index(family))
        randn = lambda *shape, std: torch.randn(*shape, generator=g) * std  # noqa: E731
        X = randn(rows, dim, std=dim ** -0.25)
        Wq0, Wk0 = randn(dim, dim, std=dim ** -0.5), randn(dim, dim, std=dim ** -0.5)
        Q0, K0 = X @ Wq0.T, X @ Wk0.T
        P0 = Q0 @ K0.T
        if family == "random":
            Z = randn(rows, rows, std=P0.std().item())
        else:  # lora: B*·A* of rank r_l; singlora: S·Sᵀ of rank 2·r_l
            f = (lambda: randn(dim, lora_rank, std=dim ** -0.5) @ randn(lora_rank, dim, std=dim ** -0.5)) \
                if family == "lora" else (lambda: (lambda S: S @ S.T)(randn(dim, 2 * lora_rank, std=dim ** -0.5)))
            dq, dk = f(), f()
            Z = (X @ (Wq0 + dq).T) @ (X @ (Wk0 + dk).T).T
        R0 = P0 - Z
        for k, v in zip(KEYS, (X, R0, Wq0.T, Wk0.T, X.T @ X, X.T @ R0 @ X)):
            out[k].append(v)
    return {k: torch.stack(v) for k, v in out.items()}


def init_params(method: str, seeds, dim: int, lora_rank: int) -> dict:
    """Initial adapters per seed, each (S, d, r): SingLoRA A via the library; LoRA as PEFT
    does it (A Kaiming-uniform a=√5 on its (r, d) shape, B = 0), A stored transposed as
    "Aq_t" so that every parameter is (S, d, r) and no product needs a transposed operand."""
    out: dict = {}
    for s in seeds:
        g = gen(s, 10 + METHODS.index(method))
        if method == "singlora":
            p = {"Aq": init_singlora_A(dim, 2 * lora_rank, g), "Ak": init_singlora_A(dim, 2 * lora_rank, g)}
        else:
            At = lambda: nn.init.kaiming_uniform_(torch.empty(lora_rank, dim), a=math.sqrt(5), generator=g).T  # noqa: E731
            p = {"Aq_t": At(), "Bq": torch.zeros(dim, lora_rank), "Ak_t": At(), "Bk": torch.zeros(dim, lora_rank)}
        for k, v in p.items():
            out.setdefault(k, []).append(v)
    return {k: torch.stack(v) for k, v in out.items()}


def coef(method: str, step: int, ramp_steps: int) -> torch.Tensor:
    """(α/r)·u(t) for SingLoRA (α = r), α/r = 1 for LoRA (PEFT has no ramp)."""
    return ramp(step, ramp_steps) if method == "singlora" else torch.tensor(1.0)


def factors(method: str, p: dict, c) -> tuple:
    """(Lq, Rq, Lk, Rk), shaped like the parameters, with ΔW = R·Lᵀ (so X·ΔWᵀ = (X·L)·Rᵀ)."""
    if method == "singlora":  # ΔW = c·A·Aᵀ
        return p["Aq"], c * p["Aq"], p["Ak"], c * p["Ak"]
    return p["Aq_t"], c * p["Bq"], p["Ak_t"], c * p["Bk"]  # ΔW = c·B·A


def delta_weights(method: str, p: dict, c) -> tuple:
    """(ΔWq, ΔWk) as dense (S, d, d) from (S, d, r) parameters; for tests and inspection."""
    Lq, Rq, Lk, Rk = factors(method, p, c)
    return Rq @ Lq.mT, Rk @ Lk.mT


# Inside the loop parameters are (S, d, L, r): S problems (family × seed), L learning rates.
# The L runs of one problem share its fixed matrices, so each (S, d, d) "kernel" is read once
# per product for all of them: these batched (d×d)·(d×width) products are memory-bound
# (≈ the same time for width 4 as for 32), so the lr sweep costs about one run, not L.
def kmul(K: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """K (S, m, d) times P (S, d, L, w) -> (S, m, L, w), one bmm of width L·w."""
    return (K @ P.flatten(2)).unflatten(2, P.shape[2:])


def low_rank(prob: dict, Lq, Rq, Lk, Rk) -> tuple:
    """(Ũ, Ṽ), each (S, d, L, 2r), with Wqᵀ·Wk − Wq0ᵀ·Wk0 = Ũ·Ṽᵀ. From Wqᵀ = Wq0ᵀ + Lq·Rqᵀ
    and Wk = Wk0 + Rk·Lkᵀ: Ũ = [Wq0ᵀ·Rk + Lq·(RqᵀRk), Lq], Ṽ = [Lk, Wk0ᵀ·Rq]."""
    LqG = torch.einsum("sdlr,slrq->sdlq", Lq, torch.einsum("sdlr,sdlq->slrq", Rq, Rk))
    return (torch.cat([kmul(prob["Wq0T"], Rk) + LqG, Lq], -1),
            torch.cat([Lk, kmul(prob["Wk0T"], Rq)], -1))


def residual(prob: dict, *f) -> torch.Tensor:
    """Scores − Z = R0 + (X·Ũ)·(X·Ṽ)ᵀ, (S, L, N, N): the exact quantity whose mean square is reported."""
    Ut, Vt = low_rank(prob, *f)
    return prob["R0"][:, None] + torch.einsum("snla,smla->slnm", kmul(prob["X"], Ut), kmul(prob["X"], Vt))


def surrogate(prob: dict, *f) -> torch.Tensor:
    """‖residual‖² − ‖R0‖², (S, L), = 2⟨C·Ṽ, Ũ⟩ + ⟨ŨᵀGŨ, ṼᵀGṼ⟩: the same gradient with three
    kernel products (G, C, plus Wq0ᵀ, Wk0ᵀ in low_rank) and no N×N tensor; a plain
    square().mean() spent over half of each step in elementwise passes over (S, N, N)."""
    Ut, Vt = low_rank(prob, *f)
    GU, GV = kmul(prob["G"], torch.cat([Ut, Vt], -1)).split(Ut.shape[-1], -1)
    gram = lambda P, GP: torch.einsum("sdla,sdlb->slab", P, GP)  # noqa: E731
    return 2 * (kmul(prob["C"], Vt) * Ut).sum((1, 3)) + (gram(Ut, GU) * gram(Vt, GV)).sum((2, 3))


def train(prob: dict, method: str, init: dict, lrs: list, iters: int, ramp_steps: int, record: list):
    """AdamW from `init` (S, d, r) for every lr at once; one param group (and leaf tensors)
    per lr. Returns the loss (len(record), S, L) after t optimizer steps, t in record ∋ iters."""
    leaves = [{k: v.clone().requires_grad_() for k, v in init.items()} for _ in lrs]
    opt = torch.optim.AdamW([{"params": list(p.values()), "lr": lr} for p, lr in zip(leaves, lrs)],
                            **ADAMW, foreach=True)
    want, out, n2 = set(record), [], prob["R0"].shape[-1] ** 2  # surrogate is a sum; loss a mean
    for t in range(iters + 1):
        p = {k: torch.stack([q[k] for q in leaves], 2) if len(lrs) > 1 else leaves[0][k].unsqueeze(2)
             for k in init}
        f = factors(method, p, coef(method, t, ramp_steps))
        if t in want:  # the reported loss is always the exact residual, never the surrogate
            with torch.no_grad():
                out.append(residual(prob, *f).square().mean((2, 3)))
        if t == iters:
            break
        opt.zero_grad(set_to_none=True)
        (surrogate(prob, *f).sum() / n2).backward()  # a sum: each (row, lr) keeps its own gradient
        opt.step()
    return torch.stack(out).numpy()


def log_grid(iters: int, points: int = 200) -> list:
    """~points log-spaced steps from 1 to iters, plus 0 (the initial loss), as plain ints."""
    return sorted({0, iters, *map(int, np.round(np.logspace(0, math.log10(max(iters, 1)), points)))})


def run(families, seeds, lrs, iters: int, dim: int = 128, rows: int = 128, lora_rank: int = 4,
        ramp_frac: float = 0.01) -> dict:
    """Every (family, seed, lr) run for both methods. Returns {"steps", "ramp_steps", "loss":
    {family: {method: {lr: array (len(steps), len(seeds))}}}}; non-finite means diverged."""
    seeds, lrs = list(seeds), [float(x) for x in lrs]
    steps, T = log_grid(iters), max(1, round(ramp_frac * iters))  # T ≥ 1 (paper: 1% of steps)
    probs = [make_problem(f, seeds, dim, rows, lora_rank) for f in families]
    prob = {k: torch.cat([q[k] for q in probs]) for k in KEYS}  # rows ordered (family, seed)
    loss = {f: {} for f in families}
    for m in METHODS:
        init = {k: v.repeat(len(families), 1, 1) for k, v in init_params(m, seeds, dim, lora_rank).items()}
        L = train(prob, m, init, lrs, iters, T, steps).reshape(len(steps), len(families), len(seeds), len(lrs))
        for j, f in enumerate(families):
            loss[f][m] = {lr: L[:, j, :, i] for i, lr in enumerate(lrs)}
    return {"steps": steps, "loss": loss, "ramp_steps": T}


def quantiles(x, qs=(0.25, 0.5, 0.75)) -> np.ndarray:
    """Linear-interpolated quantiles over the last axis with NaN counted as +inf (a
    diverged run is worse than any finite one); np.quantile would return NaN there."""
    x = np.sort(np.where(np.isnan(x), np.inf, np.asarray(x, dtype=float)), axis=-1)
    def at(pos: float):
        lo, w = x[..., math.floor(pos)], pos - math.floor(pos)
        with np.errstate(invalid="ignore"):  # inf − inf between two diverged runs: NaN, fixed below
            return lo if w == 0 else lo + (x[..., math.ceil(pos)] - lo) * w
    v = np.stack([at(q * (x.shape[-1] - 1)) for q in qs])
    return np.where(np.isnan(v), np.inf, v)


def jsonable(x):
    return [jsonable(v) for v in x] if np.ndim(x) else (float(x) if np.isfinite(x) else None)


def summarize(losses: np.ndarray) -> dict:
    q25, med, q75 = quantiles(losses[-1])
    return {"final_per_seed": jsonable(losses[-1]), "final_median": jsonable(med), "final_q25": jsonable(q25),
            "final_q75": jsonable(q75), "diverged": int((~np.isfinite(losses[-1])).sum())}


def fmt(s: dict) -> str:
    if s["final_median"] is None:
        return f"diverged ({s['diverged']}/{len(s['final_per_seed'])})"
    g = lambda v: "inf" if v is None else f"{v:.2e}"  # noqa: E731
    extra = f" ({s['diverged']} diverged)" if s["diverged"] else ""
    return f"{g(s['final_median'])} [{g(s['final_q25'])}, {g(s['final_q75'])}]{extra}"


def tables(res: dict) -> str:
    cfg = res["config"]
    lines = [f"Final MSE after {cfg['iters']} steps, lr {cfg['lr']:g}, median [q25, q75] over {cfg['seeds']} seeds",
             "", f"| family | MSE at step 0 | LoRA (r={cfg['lora_rank']}) | SingLoRA (r={2 * cfg['lora_rank']}) "
             "| LoRA/SingLoRA |", "|---|---|---|---|---|"]
    for f, d in res["main"].items():  # both start from ΔW = 0 (B = 0; u(0) = 0), so step 0 is shared
        a, b = d["lora"]["final_median"], d["singlora"]["final_median"]
        ratio = f"{a / b:.3g}" if a is not None and b else "n/a"
        start = d["lora"]["curve"]["median"][0]
        lines.append(f"| {f} | {start:.2e} | {fmt(d['lora'])} | {fmt(d['singlora'])} | {ratio} |")
    lrs = cfg["lr_sweep"]
    lines += ["", f"lr sweep: final MSE after {cfg['sweep_iters']} steps, median [q25, q75] over "
              f"{cfg['sweep_seeds']} seeds", "", "| family | method | " + " | ".join(f"lr={x:g}" for x in lrs) + " |",
              "|---|---|" + "---|" * len(lrs)]
    for f, d in res["lr_sweep"].items():
        for m in METHODS:
            lines.append(f"| {f} | {m} | " + " | ".join(fmt(d[m][f"{x:g}"]) for x in lrs) + " |")
    return "\n".join(lines)


def plot(res: dict, curves_png: Path, lr_png: Path) -> None:
    from experiments.plotting import median_band, median_errorbars, plt, save

    fams, cfg = list(res["main"]), res["config"]
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 4), squeeze=False)
    for ax, f in zip(axes[0], fams):
        for m in METHODS:
            c = res["main"][f][m]["curve"]
            median_band(ax, res["curve_steps"], c["median"], c["q25"], c["q75"], label=m)
        ax.set(title=f"target: {f}", xlabel="optimizer step", ylabel="MSE")
        ax.legend()
    fig.suptitle(f"attention toy, d={cfg['dim']}, N={cfg['rows']}, lr={cfg['lr']:g}, "
                 f"{cfg['seeds']} seeds (median, IQR)")
    save(fig, curves_png)
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 4), squeeze=False)
    for ax, f in zip(axes[0], fams):
        for m in METHODS:
            s = [res["lr_sweep"][f][m][f"{x:g}"] for x in cfg["lr_sweep"]]
            nan = lambda k: [np.nan if v[k] is None else v[k] for v in s]  # noqa: E731
            median_errorbars(ax, cfg["lr_sweep"], nan("final_median"), nan("final_q25"), nan("final_q75"), label=m)
        ax.set(title=f"target: {f} (x = diverged)", xlabel="lr", ylabel=f"MSE after {cfg['sweep_iters']} steps")
        ax.legend()
    save(fig, lr_png)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.attention_toy", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--seeds", type=int), a("--iters", type=int), a("--lr", type=float, default=1e-4)
    a("--dim", type=int, default=128), a("--rows", type=int, default=128), a("--lora-rank", type=int, default=4)
    a("--ramp-frac", type=float, default=0.01), a("--lr-sweep"), a("--sweep-seeds", type=int)
    a("--sweep-iters", type=int, help="default: --iters"), a("--families", default=",".join(FAMILIES))
    a("--out", default="results"), a("--plots", default="docs/science"), a("--threads", type=int, default=1)
    a("--quick", action="store_true", help="~30 s version (3 seeds, 1500 steps); writes *_quick names")
    args = p.parse_args(argv)
    # --quick changes only the defaults, so explicit flags still win.
    for k, v in dict(seeds=20, iters=15000, lr_sweep="1e-5,1e-4,1e-3,1e-2", sweep_seeds=5).items():
        if getattr(args, k) is None:
            setattr(args, k, QUICK[k] if args.quick else v)
    args.sweep_iters = args.sweep_iters or args.iters
    torch.set_num_threads(args.threads)
    fams, sweep = args.families.split(","), [float(x) for x in args.lr_sweep.split(",")]
    shape = dict(dim=args.dim, rows=args.rows, lora_rank=args.lora_rank, ramp_frac=args.ramp_frac)
    t0 = time.perf_counter()
    main_run = run(fams, range(args.seeds), [args.lr], args.iters, **shape)
    t1 = time.perf_counter()
    sweep_run = run(fams, range(args.sweep_seeds), sweep, args.sweep_iters, **shape)
    t2 = time.perf_counter()
    scales = {"X_entry_std": args.dim ** -0.25, "W0_entry_std": args.dim ** -0.5,
              "target_factor_entry_std": args.dim ** -0.5, "random_Z_std": "std of X Wq0^T Wk0 X^T, per seed"}
    params = {"lora": 2 * 2 * args.dim * args.lora_rank, "singlora": 2 * args.dim * 2 * args.lora_rank}
    res = {"config": dict(vars(args), families=fams, lr_sweep=sweep, alpha="= rank (scale 1)", adamw=ADAMW,
                          ramp_steps=main_run["ramp_steps"], sweep_ramp_steps=sweep_run["ramp_steps"],
                          trainable_params=params, scales=scales, torch=torch.__version__,
                          loss="mean over N x N entries of (X Wq^T Wk X^T - Z)^2, per seed"),
           "seconds": {"main": round(t1 - t0, 1), "lr_sweep": round(t2 - t1, 1), "total": round(t2 - t0, 1)},
           "curve_steps": main_run["steps"], "main": {}, "lr_sweep": {}}
    for f in fams:
        res["main"][f], res["lr_sweep"][f] = {}, {}
        for m in METHODS:
            L = main_run["loss"][f][m][args.lr]
            q25, med, q75 = quantiles(L)
            res["main"][f][m] = dict(summarize(L), curve={"median": jsonable(med), "q25": jsonable(q25),
                                                          "q75": jsonable(q75)})
            res["lr_sweep"][f][m] = {f"{lr:g}": summarize(sweep_run["loss"][f][m][lr]) for lr in sweep}
    sfx = "_quick" if args.quick else ""
    out, plots = Path(args.out), Path(args.plots)
    out.mkdir(parents=True, exist_ok=True), plots.mkdir(parents=True, exist_ok=True)
    (out / f"attention_toy{sfx}.json").write_text(json.dumps(res, indent=1, allow_nan=False))
    plot(res, plots / f"attention_toy{sfx}.png", plots / f"attention_toy_lr{sfx}.png")
    print(tables(res))
    print(f"\nwall time: main {t1 - t0:.0f} s, lr sweep {t2 - t1:.0f} s; wrote {out / f'attention_toy{sfx}.json'}")
    return res


if __name__ == "__main__":
    main()
