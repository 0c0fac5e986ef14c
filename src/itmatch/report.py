"""Readable outputs of an evaluation: JSON next to a PNG of the recall@K curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(results: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def plot_recall_curves(curves: dict[str, dict[str, list[float]]], path: str | Path, title: str = "") -> None:
    """One line per (run, direction): R@K for K = 1..len(curve). `curves` = {run label: {"i2t": [...], ...}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, direction, label in zip(axes, ("i2t", "t2i"), ("image → text", "text → image"), strict=True):
        for run, curve in curves.items():
            ks = range(1, len(curve[direction]) + 1)
            ax.plot(ks, curve[direction], label=run)
        ax.set_title(label)
        ax.set_xlabel("K")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[0].set_ylim(0, 100)
    axes[1].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
