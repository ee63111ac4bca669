"""The figures people look at beside a detector's numbers: precision-recall curves per class at
IoU 0.5, and detections drawn over sample images with the ground truth.

`pr_curves` matches as COCO does at one IoU threshold, so the AP in a curve's legend is the
per-class AP50 that runtime.detmetrics.DetectionScore reports for the same detections: per image
and class the detections are taken by score (stable order, at most `max_dets`), each one takes
the still unmatched true box of highest IoU >= the threshold; per class the detections of all
images are pooled by score, precision and recall cumulated, and AP is the mean of the monotone
precision envelope at the 101 recall points 0, 0.01, ..., 1.

Both plots always write their figure: when there is nothing to draw it says so ("no detections",
"no images") and the function returns False, else True, so a caller can log the empty case.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rsedge.runtime.detmetrics import RECALL_POINTS, box_iou

MAX_IMAGES = 6
TRUTH_STYLE = "--"


def _greedy_tp(boxes: np.ndarray, truths: np.ndarray, iou: float) -> np.ndarray:
    """True-positive flags of score-sorted detections of one class in one image (COCO's greedy
    matching; among true boxes of equal IoU the last one wins, as in COCO)."""
    ious = box_iou(boxes, truths)
    taken = np.zeros(len(truths), bool)
    tp = np.zeros(len(boxes), bool)
    for d in range(len(boxes)):
        cand = np.where(taken | (ious[d] < iou), -1.0, ious[d])
        if len(cand) and cand.max() >= 0:
            g = len(cand) - 1 - int(np.argmax(cand[::-1]))
            taken[g], tp[d] = True, True
    return tp


def _ap101(recall: np.ndarray, envelope: np.ndarray) -> float:
    q = np.zeros(len(RECALL_POINTS))
    inds = np.searchsorted(recall, RECALL_POINTS, side="left")
    ok = inds < len(envelope)
    q[ok] = envelope[inds[ok]]
    return float(q.mean())


def _class_curve(scores: list[np.ndarray], tps: list[np.ndarray], n_true: int) -> dict[str, Any]:
    scores_all = np.concatenate(scores) if scores else np.zeros(0)
    tp_all = np.concatenate(tps) if tps else np.zeros(0, bool)
    order = np.argsort(-scores_all, kind="mergesort")
    tp_sum = np.cumsum(tp_all[order], dtype=np.float64)
    fp_sum = np.cumsum(~tp_all[order], dtype=np.float64)
    recall = tp_sum / max(n_true, 1)
    precision = tp_sum / np.maximum(tp_sum + fp_sum, 1.0)
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    return {"recall": recall, "precision": precision, "precision_envelope": envelope,
            "scores": scores_all[order], "n_true": int(n_true),
            "ap": _ap101(recall, envelope) if n_true > 0 else None}


def pr_curves(detections: Sequence[tuple[Any, Any, Any]], truths: Sequence[tuple[Any, Any]], num_classes: int,
              iou: float = 0.5, max_dets: int = 100) -> list[dict[str, Any]]:
    """Per class (a list indexed by class): "recall", "precision" (one point per detection, by
    falling score), "precision_envelope" (precision made monotone from the right, what AP
    integrates), "scores", "n_true", "ap" (COCO 101-point AP at `iou`; None without true boxes).

    detections: one (boxes (k, 4) xyxy, scores (k,), classes (k,)) per image; truths: one
    (boxes (m, 4) xyxy, classes (m,)) per image, in the same order and the same pixels."""
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} images of detections for {len(truths)} images of ground truth")
    scores: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    tps: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    n_true = np.zeros(num_classes, np.int64)
    for (boxes, sc, cls), (tboxes, tcls) in zip(detections, truths):
        boxes, tboxes = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(tboxes, np.float64).reshape(-1, 4)
        sc, cls = np.asarray(sc, np.float64).reshape(-1), np.asarray(cls, np.int64).reshape(-1)
        tcls = np.asarray(tcls, np.int64).reshape(-1)
        for c in range(num_classes):
            order = np.argsort(-sc[cls == c], kind="mergesort")[:max_dets]
            mine = boxes[cls == c][order]
            n_true[c] += int((tcls == c).sum())
            scores[c].append(sc[cls == c][order])
            tps[c].append(_greedy_tp(mine, tboxes[tcls == c], iou))
    return [_class_curve(scores[c], tps[c], int(n_true[c])) for c in range(num_classes)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _class_colors(n: int) -> list[tuple[float, float, float]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N)[:3] for i in range(n)]


def _empty_figure(path: str | Path, title: str, message: str) -> bool:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14)
    ax.set_axis_off()
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return False


def plot_pr_curves(curves: list[dict[str, Any]], classes: Sequence[str], path: str | Path, title: str = "") -> bool:
    """Precision (its monotone envelope) against recall, one line per class with its AP50 in the
    legend, the mean AP over classes with true boxes in the title. False (and a figure saying "no
    detections") when no class has a detection."""
    drawn = [c for c in range(len(curves)) if len(curves[c]["recall"])]
    if not drawn:
        return _empty_figure(path, title, "no detections")
    plt = _pyplot()
    colors = _class_colors(len(classes))
    fig, ax = plt.subplots(figsize=(6, 5))
    for c in drawn:
        cur = curves[c]
        envelope = cur["precision_envelope"]
        r, p = np.concatenate([[0.0], cur["recall"]]), np.concatenate([envelope[:1], envelope])
        ap = "n/a" if cur["ap"] is None else f"{cur['ap']:.3f}"
        ax.plot(r, p, drawstyle="steps-pre", color=colors[c], label=f"{classes[c]} (AP50 {ap}, {cur['n_true']} true)")
    aps = [cur["ap"] for cur in curves if cur["ap"] is not None]
    ax.set(xlim=(0, 1.01), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    suffix = f"mAP@0.5 {np.mean(aps):.3f}" if aps else "no true boxes"
    ax.set_title(f"{title}\n{suffix}" if title else suffix)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _draw_boxes(ax, boxes, classes, scores, names, colors, dashed: bool) -> None:
    from matplotlib.patches import Rectangle

    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4)):
        c = int(classes[i])
        color = colors[c % len(colors)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, lw=1.2,
                               linestyle=TRUTH_STYLE if dashed else "-"))
        if not dashed:
            name = names[c] if 0 <= c < len(names) else str(c)
            ax.text(x1, y1, f"{name} {float(scores[i]):.2f}", fontsize=6, color="black", va="bottom", clip_on=True,
                    bbox={"facecolor": color, "alpha": 0.8, "pad": 0.5, "lw": 0})


def plot_detections(examples: list[dict[str, Any]], classes: Sequence[str], path: str | Path, title: str = "",
                    min_score: float = 0.25) -> bool:
    """A grid of up to 6 images: true boxes dashed, predictions solid with class name and score,
    both in the class's colour. Predictions scoring below `min_score` (default: the deploy
    confidence threshold) are not drawn, so evaluation-threshold outputs stay readable. False
    (and a figure saying "no images") when `examples` is empty.

    examples: dicts with "image" (uint8 HxWx3), "boxes" (k, 4) xyxy pixels of that image,
    "scores" (k,), "classes" (k,), "truth_boxes" (m, 4), "truth_classes" (m,)."""
    examples = list(examples)[:MAX_IMAGES]
    if not examples:
        return _empty_figure(path, title, "no images")
    plt = _pyplot()
    from matplotlib.lines import Line2D

    colors = _class_colors(len(classes))
    cols = min(3, len(examples))
    rows = -(-len(examples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.3 * rows + 0.8), squeeze=False)
    for ax, ex in zip(axes.ravel(), examples):
        ax.imshow(ex["image"])
        _draw_boxes(ax, ex.get("truth_boxes", np.zeros((0, 4))), ex.get("truth_classes", []), None, classes,
                    colors, dashed=True)
        scores = np.asarray(ex.get("scores", []), np.float64).reshape(-1)
        keep = scores >= min_score
        _draw_boxes(ax, np.asarray(ex.get("boxes", np.zeros((0, 4))), np.float64).reshape(-1, 4)[keep],
                    np.asarray(ex.get("classes", []), np.int64).reshape(-1)[keep], scores[keep], classes, colors,
                    dashed=False)
        ax.set_title(f"{int(keep.sum())} predicted, {len(np.asarray(ex.get('truth_classes', [])).reshape(-1))} true",
                     fontsize=9)
        ax.set_axis_off()
    for ax in axes.ravel()[len(examples):]:
        ax.set_axis_off()
    handles = [Line2D([], [], color=colors[i], label=n) for i, n in enumerate(classes)]
    handles += [Line2D([], [], color="grey", ls=TRUTH_STYLE, label="ground truth"),
                Line2D([], [], color="grey", label=f"prediction (score >= {min_score:g})")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97), h_pad=1.5)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
