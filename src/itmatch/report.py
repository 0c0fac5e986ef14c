"""Readable outputs of an evaluation: JSON next to a PNG of the recall@K curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from itmatch.errors import ItmatchError
from itmatch.fileio import atomic_write


def write_json(results: dict[str, Any], path: str | Path) -> None:
    """Write `results` as JSON atomically; a failed write (full disk) is one line naming the file."""
    text = (json.dumps(results, indent=2) + "\n").encode("utf-8")
    write_file(path, lambda fh: fh.write(text))


def write_file(path: str | Path, write: Any) -> None:
    """`atomic_write` whose OS errors (no space, no permission) are one ItmatchError line naming the file."""
    try:
        atomic_write(path, write)
    except OSError as err:
        raise ItmatchError(f"{path}: cannot write it ({err.strerror or err}); nothing was replaced") from None


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
    try:
        write_file(path, lambda fh: fig.savefig(fh, dpi=100, format="png"))
    finally:
        plt.close(fig)
