"""Small matplotlib helpers shared by the experiments: median line + IQR band on log-y axes.

Agg backend is forced here, before pyplot is imported, so scripts and tests run
headless and never need a display.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def median_band(ax, x, median, q25, q75, label: str, logx: bool = True, **line_kw):
    """Median line with a shaded 25-75 % band; non-finite/non-positive points are
    dropped (a log axis cannot show them, and inf means 'diverged')."""
    x, med, lo, hi = (np.asarray(v, dtype=float) for v in (x, median, q25, q75))
    ok = np.isfinite(med) & (med > 0) & (x > 0 if logx else True)
    (line,) = ax.plot(x[ok], med[ok], label=label, **line_kw)
    band = ok & np.isfinite(hi) & (lo > 0)
    ax.fill_between(x[band], lo[band], hi[band], color=line.get_color(), alpha=0.25, lw=0)
    ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    return line


def median_errorbars(ax, x, median, q25, q75, label: str, **kw):
    """Median markers with asymmetric IQR error bars on log-log axes; points whose
    median is not finite are drawn as an 'x' on the top edge (diverged)."""
    x, med, lo, hi = (np.asarray(v, dtype=float) for v in (x, median, q25, q75))
    ok = np.isfinite(med) & (med > 0)
    hi_ = np.where(np.isfinite(hi), hi, med)  # an infinite upper quartile has no bar to draw
    lo_ = np.where(lo > 0, lo, med)
    cont = ax.errorbar(x[ok], med[ok], yerr=[med[ok] - lo_[ok], hi_[ok] - med[ok]],
                       label=label, capsize=3, marker="o", **kw)
    if (~ok).any():
        ax.plot(x[~ok], np.ones((~ok).sum()), "x", color=cont[0].get_color(), ms=9,
                transform=ax.get_xaxis_transform(), clip_on=False)
    ax.set_xscale("log")
    ax.set_yscale("log")
    return cont


def save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
