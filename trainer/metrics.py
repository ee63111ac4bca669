"""Classification metrics and the confusion-matrix picture."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def confusion_matrix(targets: Sequence[int], preds: Sequence[int], num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(targets, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def summarize(cm: np.ndarray, classes: Sequence[str]) -> dict:
    """Top-1 and per-class accuracy (recall) from a confusion matrix whose rows are the truth."""
    total = int(cm.sum())
    per_class = {}
    for i, name in enumerate(classes):
        n = int(cm[i].sum())
        per_class[name] = float(cm[i, i] / n) if n else None
    return {
        "top1": float(np.trace(cm) / total) if total else 0.0,
        "samples": total,
        "per_class": per_class,
        "confusion": cm.tolist(),
    }


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = max(4.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    rows = cm.sum(axis=1, keepdims=True).clip(min=1)
    ax.imshow(cm / rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] / rows[i, 0] > 0.5 else "black", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
