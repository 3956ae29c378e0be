"""Tables (markdown, printed and saved) and plots of the sweep and ramp results."""
from __future__ import annotations

import statistics
from pathlib import Path

METRICS = {  # name: (label, higher is better)
    "subject_loss": ("subject denoising loss", False),
    "feature_sim": ("feature similarity to subject", True),
    "subject_rate": ("generated = the subject (magenta cross)", True),
    "prior_drift": ("prior drift (class loss - base)", False),
}
NAMES = {"singlora": "SingLoRA", "lora": "LoRA", "dora": "DoRA", "loraplus": "LoRA+"}


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
             f"{base['feature_sim']:.4f}, subject rate {base['subject_rate']:.2f}, class loss {base['class_loss']:.4f}; "
             f"real-vs-real feature similarity {data['reference']['feature_sim_real_vs_real']:.4f}.", ""]
    at_init: dict = {}
    for name, m in data.get("singlora_at_init", {}).items():
        at_init.setdefault(name.split("-")[0], []).append(m)
    for rank, ms in at_init.items():
        med = lambda k: statistics.median(x[k] for x in ms)  # noqa: E731
        lines += [f"SingLoRA {rank} at initialisation (u = 1, untrained; median of {len(ms)} seeds): subject loss "
                  f"{med('subject_loss'):.4f}, feature similarity {med('feature_sim'):.4f}, subject rate "
                  f"{med('subject_rate'):.2f}, prior drift {med('class_loss') - base['class_loss']:.4f}.", ""]
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
    for (init, frac, steps), g in sorted(groups.items(), key=lambda kv: (kv[0][0] != "ours", 0.01 if kv[0][1] is None else kv[0][1])):
        frac_s = "default (1 %)" if frac is None else f"{100 * frac:g} %"
        lines.append(f"| {init} | {frac_s} | {steps} | " + " | ".join(cell(g[m], g["diverged"]) for m in METRICS) + " |")
    return "\n".join(lines)


def errorbar(ax, x, values: list[list[float]], **kw) -> None:
    """Median and inter-quartile bar of each list of per-seed values."""
    q = [quartiles(v) if v else (float("nan"),) * 3 for v in values]
    ax.errorbar(x, [v[1] for v in q], yerr=[[v[1] - v[0] for v in q], [v[2] - v[1] for v in q]], capsize=3, **kw)


def metric_panels():
    """One panel per metric, side by side."""
    from experiments.plotting import plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    return fig, list(zip(axes, METRICS.items()))


def finish(fig, axes, title: str, path: Path) -> None:
    from experiments.plotting import save

    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    save(fig, path)


def sweep_plot(data: dict, path: Path) -> None:
    groups = group(data, lambda r: (label(r), r["lr"]))
    methods = list(dict.fromkeys(k[0] for k in groups))
    fig, panels = metric_panels()
    for ax, (m, (name, _)) in panels:
        for i, method in enumerate(methods):
            lrs = sorted(lr for (me, lr) in groups if me == method and groups[(me, lr)][m])
            x = [lr * (1 + 0.06 * (i - len(methods) / 2)) for lr in lrs]  # dodge overlapping bars
            errorbar(ax, x, [groups[(method, lr)][m] for lr in lrs], marker="o", label=method)
        if m == "prior_drift":
            ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(name, fontsize=10)
    finish(fig, panels, "Toy DreamBooth: metric vs learning rate (median, IQR over seeds)", path)


def ramp_plot(data: dict, path: Path) -> None:
    groups = group(data, lambda r: (r["init"], r["ramp_frac"]))
    fig, panels = metric_panels()
    ours = sorted((f, g) for (init, f), g in groups.items() if init == "ours" and f is not None)
    others = [g for (init, f), g in groups.items() if init != "ours"]
    for ax, (m, (name, _)) in panels:
        errorbar(ax, list(range(len(ours))), [g[m] for _, g in ours], marker="o", label="our init (fan = n)")
        if others:
            errorbar(ax, [len(ours)], [others[0][m]], marker="s", color="C3", label="PyTorch default (fan_in = r)")
        ax.set_xticks(list(range(len(ours) + 1)), [f"{100 * f:g}%" for f, _ in ours] + ["fan_in=r\n(T=1%)"], fontsize=7)
        ax.set_xlabel("ramp T (fraction of steps)")
        ax.set_title(name, fontsize=10)
    finish(fig, panels, "Toy DreamBooth: ramp length and initialisation (median, IQR over seeds)", path)


def report(command: str, data: dict, out: Path, plots: Path) -> None:
    """<out>/<command>.md and the plots; `out` holds the results and their samples/."""
    plots.mkdir(parents=True, exist_ok=True)
    text = sweep_tables(data) if command == "sweep" else ramp_tables(data)
    (out / f"{command}.md").write_text(text + "\n")
    (sweep_plot if command == "sweep" else ramp_plot)(data, plots / f"toy_world_{command}.png")
    samples_figure(data, out, plots / f"toy_world_{command}_samples.png", command)
    print(text)
    print(f"tables: {out / f'{command}.md'}; plot: {plots / f'toy_world_{command}.png'}")


def first_four(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.crop((0, 0, min(im.width, 4 * im.height), im.height))


def samples_figure(data: dict, out: Path, path: Path, command: str) -> None:
    """Generated 'a sks shape' images of the first seed: one row per method (sweep) or setting (ramp)."""
    from experiments.plotting import plt, save

    from .sweep import key

    runs = [r for r in data["runs"].values() if r["seed"] == min(x["seed"] for x in data["runs"].values())]
    if command == "sweep":
        rows = list(dict.fromkeys(label(r) for r in runs))
        cols = sorted({r["lr"] for r in runs})
        at = {(label(r), r["lr"]): r for r in runs}
        col_name = lambda c: f"lr {c:g}"
    else:
        rows = ["ramp T"]
        cols = list(dict.fromkeys((r["init"], r["ramp_frac"]) for r in runs))
        at = {("ramp T", (r["init"], r["ramp_frac"])): r for r in runs}
        col_name = lambda c: (f"T={100 * c[1]:g}%" if c[1] is not None else "T=1%") + ("" if c[0] == "ours" else f"\n{c[0]}")
    fig, axes = plt.subplots(len(rows) + 1, len(cols), figsize=(2.2 * len(cols), 0.75 * (len(rows) + 1) + 0.6),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    base = out / "samples" / "base.png"
    if base.is_file():
        axes[0, 0].imshow(first_four(base))
        axes[0, 0].set_title("base model", fontsize=7)
    for i, row in enumerate(rows, start=1):
        for j, col in enumerate(cols):
            run = at.get((row, col))
            file = out / "samples" / f"{key(run)}.png" if run else None
            if file is not None and file.is_file():
                axes[i, j].imshow(first_four(file))
            if i == 1:
                axes[i, j].set_title(col_name(col), fontsize=7)
        axes[i, 0].text(-0.05, 0.5, row.split(" (")[0], transform=axes[i, 0].transAxes, ha="right", va="center",
                        fontsize=7)
    fig.suptitle("'a sks shape' after fine-tuning (first seed, first 4 images)", fontsize=9)
    save(fig, path)
