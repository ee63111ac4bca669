"""The figure people look at before the numbers: sample images with their true and predicted
masks laid over them, and where the prediction is wrong."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

IGNORE_GREY = (128, 128, 128)


def palette(meta: dict[str, Any]) -> np.ndarray:
    """(classes + 1, 3) uint8: the dataset's own colours when it has them (a colour-coded mask
    set), else a qualitative palette; the last row is for the ignore label."""
    n = len(meta["classes"])
    if meta.get("colors") and len(meta["colors"]) == n:
        colors = np.asarray(meta["colors"], np.uint8)
    else:
        import matplotlib

        cmap = matplotlib.colormaps["tab20"]
        colors = (np.asarray([cmap(i % 20)[:3] for i in range(n)]) * 255).astype(np.uint8)
    return np.vstack([colors, np.asarray([IGNORE_GREY], np.uint8)])


def colorize(mask: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """A class map (H, W) as RGB; values outside the classes (the ignore label) in grey."""
    index = np.where(mask < len(colors) - 1, mask, len(colors) - 1)
    return colors[index]


def blend(image: np.ndarray, mask_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image.astype(np.float32) * (1 - alpha) + mask_rgb.astype(np.float32) * alpha).astype(np.uint8)


def error_map(pred: np.ndarray, truth: np.ndarray, ignore_index: int) -> np.ndarray:
    """Right pixels black, wrong ones red, unlabelled ones grey."""
    out = np.zeros(truth.shape + (3,), np.uint8)
    out[(pred != truth) & (truth != ignore_index)] = (220, 30, 30)
    out[truth == ignore_index] = IGNORE_GREY
    return out


def plot_overlays(examples: list[dict[str, np.ndarray]], meta: dict[str, Any], path: str | Path,
                  title: str = "") -> None:
    """One row per example: image, truth over it, prediction over it, errors; a class legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = palette(meta)
    ignore = int(meta.get("ignore_index", 255))
    rows = len(examples)
    fig, axes = plt.subplots(rows, 4, figsize=(12, 3 * rows + 0.8), squeeze=False)
    for r, ex in enumerate(examples):
        panels = [ex["image"], blend(ex["image"], colorize(ex["truth"], colors)),
                  blend(ex["image"], colorize(ex["pred"], colors)), error_map(ex["pred"], ex["truth"], ignore)]
        for c, (ax, panel) in enumerate(zip(axes[r], panels)):
            ax.imshow(panel)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(("image", "true mask", "predicted mask", "errors (red)")[c])
    handles = [Patch(color=colors[i] / 255.0, label=name) for i, name in enumerate(meta["classes"])]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
