"""Tables (markdown, printed and saved) and plots of the sweep and ramp results."""
from __future__ import annotations

import statistics
from pathlib import Path

METRICS = {  # name: (label, higher is better)
    "subject_loss": ("subject denoising loss", False),
    "feature_sim": ("feature similarity to subject", True),
    "star_rate": ("generated = orange star", True),
    "prior_drift": ("prior drift (class loss - base)", False),
}
NAMES = {"singlora": "SingLoRA", "lora": "LoRA", "dora": "DoRA"}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def label(run: dict) -> str:
    return f"{NAMES[run['adapter']]} r{run['rank']} ({run['params']:,} params)"


def group(data: dict, by) -> dict:
    """{group key: {metric: [values over seeds]}, with diverged runs counted apart}."""
    base_class = data["base"]["class_loss"]
    groups: dict = {}
    for run in data["runs"].values():
        g = groups.setdefault(by(run), {"diverged": 0, **{m: [] for m in METRICS}})
        if run.get("diverged"):
            g["diverged"] += 1
            continue
        for m in METRICS:
            g[m].append(run["class_loss"] - base_class if m == "prior_drift" else run[m])
    return groups


def cell(values: list[float], diverged: int) -> str:
    if not values:
        return "diverged"
    q1, med, q3 = quartiles(values)
    return f"{med:.4f} [{q1:.4f}, {q3:.4f}]" + (f" ({diverged} div.)" if diverged else "")


def sweep_tables(data: dict) -> str:
    groups = group(data, lambda r: (label(r), r["lr"]))
    methods = list(dict.fromkeys(k[0] for k in groups))
    lrs = sorted({k[1] for k in groups})
    base = data["base"]
    lines = [f"Base model (no adapter): subject loss {base['subject_loss']:.4f}, feature similarity "
             f"{base['feature_sim']:.4f}, orange-star rate {base['star_rate']:.2f}, class loss {base['class_loss']:.4f}; "
             f"real-vs-real feature similarity {data['reference']['feature_sim_real_vs_real']:.4f}.", ""]
    for m, (name, _) in METRICS.items():
        lines += [f"**{name}**: median [q25, q75] over seeds", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | spread across lrs |",
                  "|---" * (len(lrs) + 2) + "|"]
        for method in methods:
            medians = [quartiles(groups[(method, lr)][m])[1] for lr in lrs if groups.get((method, lr), {}).get(m)]
            spread = f"{max(medians) - min(medians):.4f}" if len(medians) > 1 else "-"
            lines.append(f"| {method} | " + " | ".join(cell(groups[(method, lr)][m], groups[(method, lr)]["diverged"])
                                                      if (method, lr) in groups else "-" for lr in lrs)
                         + f" | {spread} |")
        lines.append("")
    return "\n".join(lines)


def ramp_tables(data: dict) -> str:
    groups = group(data, lambda r: (r["init"], r["ramp_frac"], r["ramp_up_steps"]))
    lines = ["| init | ramp T (fraction of steps) | T (steps) | " + " | ".join(n for n, _ in METRICS.values()) + " |",
             "|---" * (3 + len(METRICS)) + "|"]
    for (init, frac, steps), g in sorted(groups.items(), key=lambda kv: (kv[0][0] != "ours", kv[0][1] or 0.01)):
        frac_s = "default (1 %)" if frac is None else f"{100 * frac:g} %"
        lines.append(f"| {init} | {frac_s} | {steps} | " + " | ".join(cell(g[m], g["diverged"]) for m in METRICS) + " |")
    return "\n".join(lines)


def sweep_plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(data, lambda r: (label(r), r["lr"]))
    methods = list(dict.fromkeys(k[0] for k in groups))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for ax, (m, (name, _)) in zip(axes, METRICS.items()):
        for i, method in enumerate(methods):
            lrs = sorted(lr for (me, lr) in groups if me == method and groups[(me, lr)][m])
            q = [quartiles(groups[(method, lr)][m]) for lr in lrs]
            x = [lr * (1 + 0.06 * (i - len(methods) / 2)) for lr in lrs]  # dodge overlapping bars
            ax.errorbar(x, [v[1] for v in q], yerr=[[v[1] - v[0] for v in q], [v[2] - v[1] for v in q]],
                        marker="o", capsize=3, label=method)
        if m == "prior_drift":
            ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(name, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle("Toy DreamBooth: metric vs learning rate (median, IQR over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ramp_plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(data, lambda r: (r["init"], r["ramp_frac"]))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    ours = sorted((f, g) for (init, f), g in groups.items() if init == "ours" and f is not None)
    for ax, (m, (name, _)) in zip(axes, METRICS.items()):
        xs = list(range(len(ours)))
        q = [quartiles(g[m]) if g[m] else (float("nan"),) * 3 for _, g in ours]
        ax.errorbar(xs, [v[1] for v in q], yerr=[[v[1] - v[0] for v in q], [v[2] - v[1] for v in q]],
                    marker="o", capsize=3, label="our init (fan = n)")
        for init, g in ((i, g) for (i, f), g in groups.items() if i != "ours"):
            if g[m]:
                q1, med, q3 = quartiles(g[m])
                ax.errorbar([len(ours)], [med], yerr=[[med - q1], [q3 - med]], marker="s", color="C3", capsize=3,
                            label="PyTorch default (fan_in = r)")
        ax.set_xticks(list(range(len(ours) + 1)), [f"{100 * f:g}%" for f, _ in ours] + ["fan_in=r\n(T=1%)"], fontsize=7)
        ax.set_xlabel("ramp T (fraction of steps)")
        ax.set_title(name, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle("Toy DreamBooth: ramp length and initialisation (median, IQR over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(command: str, data: dict, world: Path, plots: Path) -> None:
    plots.mkdir(parents=True, exist_ok=True)
    text = sweep_tables(data) if command == "sweep" else ramp_tables(data)
    (world / f"{command}.md").write_text(text + "\n")
    (sweep_plot if command == "sweep" else ramp_plot)(data, plots / f"toy_world_{command}.png")
    print(text)
    print(f"tables: {world / f'{command}.md'}; plot: {plots / f'toy_world_{command}.png'}")
