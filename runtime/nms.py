"""Non-maximum suppression and a detector's postprocessing, in numpy (Python 3.6), for the device.

A YOLO-style detector exported by rsedge outputs every anchor's box (A, 4) xyxy in input pixels
and its class scores (A, C) = objectness x class probability; what a user wants is a short list
of boxes. `postprocess` does the usual three steps:

1. Thresholding, multi-label: an anchor yields one candidate per class whose score is >= the
   confidence threshold (so one box can be both a "ship" and a "harbor" candidate). This is what
   YOLO-style evaluation does at confidence 0.001 and it is what the host scores with, so device
   and host mAP agree; at a deployment threshold (0.25) an anchor rarely passes for two classes.
2. At most `max_candidates` (30,000) candidates, the highest scoring, go on to NMS: at
   confidence 0.001 a barely trained model passes nearly every anchor and class.
3. Greedy NMS per class (class-aware; or over all classes, class_agnostic=True) in descending
   score order, stopping once `max_det` boxes are kept: greedy NMS keeps boxes in score order, so
   the first max_det kept are exactly the top max_det of a full run, and the loop runs at most
   max_det times whatever the number of candidates.

IoU is computed without the old "+1" (w = x2 - x1); a box is suppressed when its IoU with a kept
box is strictly greater than the threshold, as torchvision.ops.nms does (tests check both
against it).
"""

import numpy as np

DEFAULT_MAX_CANDIDATES = 30000


def _stable_order(scores):
    """Indices by descending score; equal scores keep their input order."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")


def _greedy(boxes, order, iou_threshold, max_keep):
    """Greedy NMS over `boxes` (float64 (K, 4)) visited in `order`; kept indices in that order."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep = []
    while order.size and (max_keep is None or len(keep) < max_keep):
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])
        h = np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])
        inter = np.clip(w, 0, None) * np.clip(h, 0, None)
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def nms(boxes, scores, iou_threshold, max_keep=None):
    """Indices of the boxes (K, 4) xyxy kept by greedy NMS, by descending score (ties: input order).

    max_keep: stop after that many kept (the same first max_keep a full run would keep)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores).reshape(-1)
    if len(scores) != len(boxes):
        raise ValueError("nms: {} scores for {} boxes".format(len(scores), len(boxes)))
    return _greedy(boxes, _stable_order(scores), float(iou_threshold), max_keep)


def batched_nms(boxes, scores, classes, iou_threshold, max_keep=None):
    """Class-aware NMS: boxes of different classes never suppress each other. Indices kept, by
    descending score over all classes.

    Done as one NMS on boxes shifted by class * (coordinate span + 1), so that boxes of two classes
    cannot overlap (the usual coordinate-offset trick): same result as NMS class by class."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if len(classes) != len(boxes):
        raise ValueError("batched_nms: {} classes for {} boxes".format(len(classes), len(boxes)))
    if not len(boxes):
        return np.zeros((0,), dtype=np.int64)
    low, high = float(boxes.min()), float(boxes.max())
    shifted = boxes - low + (classes * (high - low + 1.0))[:, None]
    return nms(shifted, scores, iou_threshold, max_keep)


def postprocess(boxes, scores, conf_threshold, iou_threshold, max_det=300, class_agnostic=False,
                max_candidates=DEFAULT_MAX_CANDIDATES):
    """One image's detections from every anchor's box (A, 4) and class scores (A, C).

    Returns (boxes (k, 4) float32, scores (k,) float32, classes (k,) int64), k <= max_det, by
    descending score. See the module docstring for the steps (multi-label thresholding, candidate
    cap, class-aware NMS unless class_agnostic)."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    scores = np.asarray(scores)
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.ndim != 2 or scores.shape[0] != boxes.shape[0]:
        raise ValueError("postprocess: scores {} do not match boxes {} (expected (A, C) and (A, 4))".format(
            scores.shape, boxes.shape))
    anchor, cls = np.nonzero(scores >= conf_threshold)
    cand = scores[anchor, cls]
    if len(cand) > max_candidates:
        top = _stable_order(cand)[:int(max_candidates)]
        top.sort()  # back to anchor order, so that score ties keep anchor order in NMS
        anchor, cls, cand = anchor[top], cls[top], cand[top]
    if class_agnostic:
        keep = nms(boxes[anchor], cand, iou_threshold, max_keep=max_det)
    else:
        keep = batched_nms(boxes[anchor], cand, cls, iou_threshold, max_keep=max_det)
    return (np.asarray(boxes[anchor[keep]], dtype=np.float32).reshape(-1, 4),
            np.asarray(cand[keep], dtype=np.float32), cls[keep].astype(np.int64))
