"""Phase 3: the finished cells' result.json -> table.csv, table.md, table.png (no model runs here).

Per method: the mean of each metric over its cells (subject x seed; with every cell present each
subject weighs the same), and a 95 % percentile-bootstrap interval that resamples both levels the
numbers vary over: subjects with replacement, then, within each drawn subject, its seeds with
replacement. Paired differences against the baseline use the cells both rows have (same subject,
seed, prompts and image seeds), resampled the same way. The paper reports single numbers without
seeds or spread; its numbers sit beside ours, never inside the intervals.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..evaluation.report import COLOURS, LABELS
from ..files import atomic_path, write_text
from .claims import RESULT
from .plan import METRICS, GridPlan

PAPER_NAMES = LABELS["dreambench"]  # the paper's numbers are DreamBench's, whatever our scorer
BOOTSTRAP_DRAWS = 10_000
LEVEL = 0.95


def bootstrap(values: dict[tuple[str, int], float], draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): `values` keyed by (subject, seed); two-level percentile bootstrap."""
    by_subject: dict[str, list[float]] = {}
    for (subject, _), v in sorted(values.items()):
        by_subject.setdefault(subject, []).append(v)
    if not by_subject:
        return (float("nan"),) * 3
    counts = np.array([len(v) for v in by_subject.values()])
    table = np.full((len(counts), counts.max()), np.nan)
    for i, v in enumerate(by_subject.values()):
        table[i, :len(v)] = v
    rng = np.random.default_rng(seed)
    subjects = rng.integers(len(counts), size=(draws, len(counts)))            # (draws, S)
    n = counts[subjects][..., None]                                             # seeds of each drawn subject
    picks = (rng.random((draws, len(counts), counts.max())) * n).astype(int)    # seeds drawn within it
    used = np.arange(counts.max()) < n                                          # the first n draws count
    drawn = np.where(used, table[subjects[..., None], picks], 0.0)
    means = drawn.sum(axis=(1, 2)) / used.sum(axis=(1, 2))
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(np.mean(list(values.values()))), float(low), float(high)


def read_results(out: Path, plan: GridPlan) -> list[dict]:
    """The finished cells of this plan, in plan order."""
    results = []
    for cell in plan.cells:
        path = out / "cells" / cell.key / RESULT
        if path.is_file():
            results.append(json.loads(path.read_text()))
    return results


def summarise(plan: GridPlan, results: list[dict]) -> list[dict]:
    """One row per method: counts, means and intervals, paired differences, the paper's numbers."""
    scored = {(r["method"], r["subject"], r["seed"]): r for r in results if not r.get("diverged")}
    rows = []
    for method in plan.methods:
        mine = [r for r in results if r["method"] == method.name]
        row = dict(method=method.name, adapter=method.adapter, rank=method.rank, cells=len(mine),
                   planned=len(plan.subjects) * len(plan.seeds), diverged=sum(bool(r.get("diverged")) for r in mine),
                   params=sorted({r["params"] for r in mine if "params" in r}))
        for m in METRICS:
            values = {(s, seed): r[m] for (name, s, seed), r in scored.items() if name == method.name}
            row[m] = bootstrap(values)
            pairs = {k: values[k] - scored[(plan.baseline, *k)][m] for k in values if (plan.baseline, *k) in scored}
            row[f"{m}_diff"] = bootstrap(pairs) if method.name != plan.baseline else None
            row[f"{m}_pairs"] = len(pairs)
            row[f"paper_{m}"] = method.paper.get(m)
        rows.append(row)
    return rows


def _ci(v) -> str:
    if v is None:
        return "—"
    mean, low, high = v
    return "—" if mean != mean else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _diff(v, pairs: int) -> str:
    if v is None:
        return "(baseline)"
    mean, low, high = v
    if mean != mean:
        return "—"
    sign = " *" if pairs > 1 and (low > 0 or high < 0) else ""  # the interval excludes 0
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]{sign}"


def _params(row) -> str:
    return ", ".join(f"{p:,}" for p in row["params"]) or "—"


def labels(plan: GridPlan) -> tuple[str, ...]:
    return LABELS[plan.evaluation.get("scorer", "dreambench")]


def markdown(plan: GridPlan, rows: list[dict], total: int) -> str:
    names = labels(plan)
    done = sum(r["cells"] for r in rows)
    toy = plan.evaluation.get("scorer") == "toy"
    lines = [f"# {plan.name}", "",
             f"{done} of {total} cells ({len(plan.subjects)} subjects x {len(plan.methods)} methods x "
             f"{len(plan.seeds)} seeds); plan `{plan.path.name}`, base `{plan.base}`.",
             f"Mean over cells [{LEVEL:.0%} bootstrap interval over subjects, then seeds within a subject].", ""]
    if toy:
        lines += ["**Toy-world scores** (the toy base's own extractor), not DreamBench's DINO / CLIP: the paper's "
                  "numbers are on another scale and are shown for the ranking only.", ""]
    paper = " | ".join(f"paper {n}" for n, m in zip(PAPER_NAMES, METRICS) if any(r[f"paper_{m}"] is not None for r in rows))
    lines += ["| method | parameters | cells | " + " | ".join(names) + (f" | {paper}" if paper else "") + " |",
              "|---|---:|---:|" + "---|" * len(names) + ("---:|" * paper.count("paper") if paper else "")]
    for r in rows:
        cells = f"{r['cells']}/{r['planned']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
        paper_cells = [f"{r[f'paper_{m}']:.3f}" if r[f"paper_{m}"] is not None else "—" for m in METRICS
                       if any(x[f"paper_{m}"] is not None for x in rows)]
        lines.append(f"| {r['method']} | {_params(r)} | {cells} | " + " | ".join(_ci(r[m]) for m in METRICS)
                     + "".join(f" | {p}" for p in paper_cells) + " |")
    lines += ["", f"Paired differences against **{plan.baseline}** (same subjects, seeds, prompts and image seeds; "
                  f"* = the interval excludes 0):", "",
              "| method | " + " | ".join(f"Δ {n}" for n in names) + " | pairs |", "|---|" + "---|" * len(names) + "---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(_diff(r[f'{m}_diff'], r[f'{m}_pairs']) for m in METRICS)
                     + f" | {r['dino_pairs']} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = ["method", "adapter", "rank", "params", "cells", "planned", "diverged"]
    for m in METRICS:
        columns += [m, f"{m}_low", f"{m}_high", f"{m}_diff", f"{m}_diff_low", f"{m}_diff_high", f"paper_{m}"]
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            line = [r["method"], r["adapter"], r["rank"], ";".join(map(str, r["params"])), r["cells"], r["planned"],
                    r["diverged"]]
            for m in METRICS:
                line += [*(r[m] or ("",) * 3), *(r[f"{m}_diff"] or ("",) * 3), r[f"paper_{m}"] or ""]
            w.writerow(line)


def plot(plan: GridPlan, rows: list[dict], path: Path) -> None:
    """One panel per metric: each method's mean (dot) and interval (bar), the baseline's mean (dotted);
    the paper's value (diamond) where it has one and the scores are DreamBench's."""
    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    show_paper = plan.evaluation.get("scorer", "dreambench") == "dreambench"
    left, panel_w, row_h, top = 150, 260, 28, 48
    image = Image.new("RGB", (left + panel_w * len(METRICS) + 20, top + row_h * len(rows) + 40), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), plan.name, fill="black", font=font)
    for p, (m, name) in enumerate(zip(METRICS, labels(plan))):
        x0 = left + p * panel_w
        values = [v for r in rows if r[m] and r[m][0] == r[m][0] for v in r[m][1:]]
        values += [r[f"paper_{m}"] for r in rows if show_paper and r[f"paper_{m}"] is not None]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        pad = (hi - lo) * 0.1 or 0.05
        lo, hi = lo - pad, hi + pad
        to_x = lambda v: x0 + 10 + (v - lo) / (hi - lo) * (panel_w - 30)  # noqa: E731
        draw.text((x0 + 10, 28), name[:34], fill="black", font=small)
        draw.line([x0 + 10, top + row_h * len(rows) + 4, x0 + panel_w - 20, top + row_h * len(rows) + 4], fill="grey")
        draw.text((x0 + 10, top + row_h * len(rows) + 8), f"{lo:.3f}", fill="grey", font=small)
        draw.text((x0 + panel_w - 60, top + row_h * len(rows) + 8), f"{hi:.3f}", fill="grey", font=small)
        base = next(r[m] for r in rows if r["method"] == plan.baseline)
        if base and base[0] == base[0]:  # the baseline's mean, as a dotted line down the panel
            for y in range(top, top + row_h * len(rows), 6):
                draw.line([to_x(base[0]), y, to_x(base[0]), y + 2], fill="grey")
        for i, r in enumerate(rows):
            y = top + row_h * i + row_h // 2
            colour = COLOURS[i % len(COLOURS)]
            if p == 0:
                draw.text((10, y - 7), r["method"][:20], fill="black", font=small)
            if r[m] and r[m][0] == r[m][0]:
                mean, low, high = r[m]
                draw.line([to_x(low), y, to_x(high), y], fill=colour, width=3)
                draw.ellipse([to_x(mean) - 4, y - 4, to_x(mean) + 4, y + 4], fill=colour)
            if show_paper and r[f"paper_{m}"] is not None:
                x = to_x(r[f"paper_{m}"])
                draw.polygon([(x, y - 6), (x + 5, y), (x, y + 6), (x - 5, y)], outline="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_table(out: Path, plan: GridPlan) -> dict[str, Path]:
    """table.md, table.csv and table.png in `out` from whatever cells are finished."""
    rows = summarise(plan, read_results(out, plan))
    files = {"md": out / "table.md", "csv": out / "table.csv", "png": out / "table.png"}
    write_text(files["md"], markdown(plan, rows, len(plan.cells)))
    write_csv(files["csv"], rows)
    plot(plan, rows, files["png"])
    return files
