"""Training curve PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_history(
    history: list[dict[str, Any]], path: str | Path, ylabel: str = "fitness (score / full-cache score)"
) -> None:
    """Best / population-mean / CMA-mean fitness per generation, retained KV fraction on a second axis,
    dashed lines at stage boundaries."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [h["global_generation"] for h in history]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(g, [h["best"] for h in history], label="best candidate", color="tab:green")
    ax.plot(g, [h["mean"] for h in history], label="population mean", color="tab:blue")
    cm = [
        (x, h["mean_candidate"])
        for x, h in zip(g, history, strict=True)
        if h.get("mean_candidate") is not None
    ]
    if cm:
        ax.plot(*zip(*cm, strict=True), label="CMA mean", color="tab:purple", marker=".")
    ax.set_xlabel("generation")
    ax.set_ylabel(ylabel)
    for prev, h in zip(history, history[1:], strict=False):
        if h["stage"] != prev["stage"]:
            ax.axvline(h["global_generation"] - 0.5, color="grey", linestyle="--", linewidth=0.8)
    kept = [
        (x, h["retained_fraction"])
        for x, h in zip(g, history, strict=True)
        if h.get("retained_fraction") is not None
    ]
    ax2 = ax.twinx()
    if kept:
        ax2.plot(*zip(*kept, strict=True), label="retained KV fraction", color="tab:orange", alpha=0.7)
    ax2.set_ylabel("retained KV fraction")
    ax2.set_ylim(0, 1.05)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
