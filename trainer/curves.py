"""Per-epoch `results.csv` and `results.png` in the run directory (Ultralytics' names), rewritten
atomically after every epoch so a run can be watched, or judged after a crash, from its folder."""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .records import atomic_write_bytes

METRICS = ("train_acc", "val_top1")  # classification's; a task names its own (`Task.metric_key`)
CSV_NAME, PNG_NAME = "results.csv", "results.png"


def results_csv(history: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS) -> str:
    columns = ("epoch", "train_loss", *metrics, "lr", "seconds")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for entry in history:
        w.writerow(["" if entry.get(c) is None else _fmt(entry[c]) for c in columns])
    return buf.getvalue()


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def results_png(history: Sequence[dict[str, Any]], title: str = "", metrics: Sequence[str] = METRICS) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(epochs, [e["train_loss"] for e in history], marker="o", label="train loss")
    axes[0].set_title("loss")
    train_key, val_key = metrics
    labels = ("train accuracy", "val top-1", "accuracy") if tuple(metrics) == METRICS else (
        train_key, val_key, val_key.split("_", 1)[-1])
    axes[1].plot(epochs, [e[train_key] for e in history], marker="o", label=labels[0])
    val = [(e["epoch"], e[val_key]) for e in history if e.get(val_key) is not None]
    if val:
        axes[1].plot(*zip(*val), marker="o", label=labels[1])
    axes[1].set_title(labels[2])
    axes[2].plot(epochs, [e["lr"] for e in history], marker="o", label="lr (epoch start)")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_curves(run_dir: str | os.PathLike, history: Sequence[dict[str, Any]], title: str = "",
                 metrics: Sequence[str] = METRICS) -> None:
    """`metrics`: the history keys of the training and the validation metric."""
    run_dir = Path(run_dir)
    atomic_write_bytes(run_dir / CSV_NAME, results_csv(history, metrics).encode())
    if history:
        atomic_write_bytes(run_dir / PNG_NAME, results_png(history, title, metrics))


def curve_title(meta: dict[str, Any]) -> str:
    stages = [h.get("stage") for h in meta.get("history", []) if isinstance(h, dict)]
    return " ".join(str(x) for x in (meta.get("arch"), stages[-1] if stages else None) if x)
