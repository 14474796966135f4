"""PNG plots for the quantization reports (matplotlib, Agg backend): readable at a glance.

- layer_bars: one row per layer, SQNR (dB) on the left and AbsMax (log scale; weights and input
  activations) on the right; flagged layers in red, layers kept in high precision in grey.
- histograms: log-scale histograms of |x| of the worst layers' input activations and weights,
  with the E4M3 per-token underflow limit marked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onerec.plots import pyplot

FLAG_COLOR, OK_COLOR, KEPT_COLOR = "#d62728", "#1f77b4", "#9e9e9e"


def layer_bars(
    layers: dict[str, dict], path: str | Path, title: str, flagged: set[str] = frozenset(),
    kept: set[str] = frozenset(), sqnr_threshold_db: float | None = None,
) -> Path:
    """layers: name -> {"sqnr_db", "activation_absmax", "weight_absmax"} (missing values allowed)."""
    plt = pyplot()
    names = list(layers)
    y = np.arange(len(names))
    colors = [FLAG_COLOR if n in flagged else KEPT_COLOR if n in kept else OK_COLOR for n in names]
    height = max(3.0, 0.28 * len(names) + 1.5)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, height), sharey=True)
    sqnr = [layers[n].get("sqnr_db") for n in names]
    ax1.barh(y, [0.0 if s is None else s for s in sqnr], color=colors)
    for i, s in enumerate(sqnr):
        ax1.text(0.5 if s is None or s < 5 else s + 0.5, i, "n/a" if s is None else f"{s:.1f}", va="center", fontsize=7)
    if sqnr_threshold_db is not None:
        ax1.axvline(sqnr_threshold_db, color=FLAG_COLOR, ls="--", lw=1, label=f"flag below {sqnr_threshold_db:g} dB")
        ax1.legend(loc="lower right", fontsize=8)
    ax1.set_xlabel("SQNR of FP8 vs high-precision output (dB, higher is better)")
    ax1.set_yticks(y, names, fontsize=8)
    ax1.invert_yaxis()
    ax1.grid(axis="x", alpha=0.3)
    act = [layers[n].get("activation_absmax") or 0.0 for n in names]
    wt = [layers[n].get("weight_absmax") or 0.0 for n in names]
    ax2.barh(y - 0.2, act, height=0.4, color=colors)
    ax2.barh(y + 0.2, wt, height=0.4, color=colors, alpha=0.45, hatch="//")
    ax2.set_xscale("log")
    ax2.set_xlabel("AbsMax, log scale (solid: input activations, hatched: weights)")
    ax2.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (OK_COLOR, FLAG_COLOR, KEPT_COLOR)]
    fig.legend(handles, ["FP8 ok", "flagged: FP8-unsafe", "kept in high precision"], loc="upper right", ncol=3, fontsize=8)
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def histograms(
    samples: dict[str, dict[str, np.ndarray]], path: str | Path, title: str, notes: dict[str, str] | None = None,
) -> Path:
    """samples: layer -> {"activation": |x| values, "weight": |w| values}; one row per layer."""
    plt = pyplot()
    names = list(samples) or ["(none)"]
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 2.6 * len(names) + 0.8), squeeze=False)
    for row, name in enumerate(names):
        for col, kind in enumerate(("activation", "weight")):
            ax = axes[row, col]
            values = np.abs(np.asarray(samples.get(name, {}).get(kind, []), dtype=np.float64))
            values = values[values > 0]
            if values.size == 0:
                ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
            else:
                bins = np.logspace(np.log10(values.min()), np.log10(values.max()) + 1e-9, 60)
                ax.hist(values, bins=bins, color=FLAG_COLOR if notes and name in notes else OK_COLOR)
                ax.set_xscale("log")
                ax.set_yscale("log")
                amax = values.max()
                # Below amax * 2^-9 / 448 a per-token (or per-channel) E4M3 scale flushes to zero.
                ax.axvline(amax * 2.0**-9 / 448.0, color="k", ls="--", lw=1, label="E4M3 flush-to-0 below AbsMax * 2^-9 / 448")
                ax.legend(fontsize=7, loc="upper left")
            label = f"{name}: {kind} |x|"
            if notes and name in notes and col == 0:
                label += f"\n{notes[name]}"
            ax.set_title(label, fontsize=8, loc="left")
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
