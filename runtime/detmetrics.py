"""Object detection metrics (COCO mAP), numpy only, so the device scores exactly as the host.

`DetectionScore` reimplements the bbox evaluation of pycocotools / faster-coco-eval for the
"all" area range and one detection limit, and a test checks it against faster-coco-eval to 1e-3:

- IoU of boxes in pixel coordinates without the old "+1" (w = x2 - x1), as pycocotools >= 2.0
  and faster-coco-eval compute it.
- Per image and class the detections are sorted by score (stable) and at most `max_dets` kept
  (COCO applies maxDets per image *and category*, not per image overall). Each detection, in
  that order, takes the still unmatched ground truth of highest IoU >= the threshold; ignored
  ground truths are tried last and only when no ordinary one matched. A detection matched to an
  ignored box counts neither as a true nor as a false positive; ignored boxes are not counted in
  the recall denominator (COCO's treatment of boxes outside the area range; there are no crowd
  boxes here).
- Per class, detections of all images are pooled and sorted by score (stable, images in the
  order they were added), precision / recall cumulated, precision made monotone from the right
  and sampled at the 101 recall points 0, 0.01, ..., 1 (np.searchsorted side="left"; points
  beyond the reached recall count 0). AP is the mean of the samples; mAP the mean over classes
  that have at least one (non-ignored) true box: a class without one is left out (COCO's -1) and
  its AP is reported as None.

"precision" and "recall" are an operating point, not part of COCO: at IoU 0.5, pooling the
detections of every class (micro average), at the score threshold with the best F1 (a threshold
keeps every detection scoring >= it); "score_threshold" is that threshold.
"""

import numpy as np

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def box_iou(a, b):
    """IoU of every box in `a` (N, 4) with every box in `b` (M, 4), both x1 y1 x2 y2 -> (N, M)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _match(ious, gt_ignore, thresholds):
    """COCO's greedy matching of score-sorted detections to ground truth (ignored gts last).

    Returns (matched, ignored), both (T, D) bool: a detection is ignored when it matched an
    ignored ground truth.
    """
    n_det, n_gt = ious.shape
    matched = np.zeros((len(thresholds), n_det), dtype=bool)
    ignored = np.zeros((len(thresholds), n_det), dtype=bool)
    for t, thr in enumerate(thresholds):
        gt_taken = np.zeros(n_gt, dtype=bool)
        for d in range(n_det):
            best = min(thr, 1 - 1e-10)
            m = -1
            for g in range(n_gt):
                if gt_taken[g]:
                    continue
                if m > -1 and not gt_ignore[m] and gt_ignore[g]:
                    break
                if ious[d, g] < best:
                    continue
                best = ious[d, g]
                m = g
            if m == -1:
                continue
            matched[t, d] = True
            ignored[t, d] = gt_ignore[m]
            gt_taken[m] = True
    return matched, ignored


def _average_precision(tp, fp, n_true):
    """COCO's 101-point interpolated AP from score-sorted TP / FP flags of one class."""
    tp_sum = np.cumsum(tp, dtype=np.float64)
    fp_sum = np.cumsum(fp, dtype=np.float64)
    recall = tp_sum / n_true
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    q = np.zeros(len(RECALL_POINTS))
    inds = np.searchsorted(recall, RECALL_POINTS, side="left")
    ok = inds < len(precision)
    q[ok] = precision[inds[ok]]
    return float(q.mean())


def _best_f1(scores, tp, fp, n_true):
    """(precision, recall, score threshold) at the cut with the best F1; ties in score kept whole."""
    if n_true == 0 or len(scores) == 0:
        return 0.0, 0.0, None
    order = np.argsort(-scores, kind="mergesort")
    scores, tp, fp = scores[order], tp[order], fp[order]
    tp_sum = np.cumsum(tp, dtype=np.float64)
    fp_sum = np.cumsum(fp, dtype=np.float64)
    cuts = np.nonzero(np.append(scores[1:] != scores[:-1], True))[0]
    p = tp_sum[cuts] / np.maximum(tp_sum[cuts] + fp_sum[cuts], 1.0)
    r = tp_sum[cuts] / n_true
    f1 = 2 * p * r / np.where(p + r > 0, p + r, 1.0)
    i = int(np.argmax(f1))
    return float(p[i]), float(r[i]), float(scores[cuts[i]])


class DetectionScore(object):
    """Accumulates detections and ground truth image by image; `result()` gives COCO mAP."""

    def __init__(self, num_classes, class_names=None, iou_thresholds=None, max_dets=100):
        if iou_thresholds is None:
            iou_thresholds = COCO_IOU_THRESHOLDS
        self.iou_thresholds = np.asarray(iou_thresholds, dtype=np.float64)
        hits = np.nonzero(np.isclose(self.iou_thresholds, 0.5))[0]
        if len(hits) == 0:
            raise ValueError("iou_thresholds must contain 0.5 (mAP@0.5 is the primary metric)")
        self._t50 = int(hits[0])
        self.num_classes = int(num_classes)
        if class_names is None:
            class_names = [str(c) for c in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError("class_names has %d names for %d classes"
                             % (len(class_names), self.num_classes))
        self.class_names = list(class_names)
        self.max_dets = int(max_dets)
        self.n_images = 0
        self._n_true = np.zeros(self.num_classes, dtype=np.int64)
        self._scores = [[] for _ in range(self.num_classes)]
        self._matched = [[] for _ in range(self.num_classes)]
        self._ignored = [[] for _ in range(self.num_classes)]

    def _classes(self, classes, n, what):
        classes = np.asarray(classes, dtype=np.int64).reshape(-1)
        if len(classes) != n:
            raise ValueError("%s: %d classes for %d boxes" % (what, len(classes), n))
        if len(classes) and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError("%s: class ids must be in [0, %d)" % (what, self.num_classes))
        return classes

    def add(self, pred_boxes, pred_scores, pred_classes, true_boxes, true_classes, ignore=None):
        """Score one image: boxes x1 y1 x2 y2 in pixels; `ignore` (G,) marks don't-care truths."""
        pred_boxes = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
        pred_scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
        true_boxes = np.asarray(true_boxes, dtype=np.float64).reshape(-1, 4)
        if len(pred_scores) != len(pred_boxes):
            raise ValueError("predictions: %d scores for %d boxes"
                             % (len(pred_scores), len(pred_boxes)))
        pred_classes = self._classes(pred_classes, len(pred_boxes), "predictions")
        true_classes = self._classes(true_classes, len(true_boxes), "ground truth")
        if ignore is None:
            ignore = np.zeros(len(true_boxes), dtype=bool)
        ignore = np.asarray(ignore, dtype=bool).reshape(-1)
        if len(ignore) != len(true_boxes):
            raise ValueError("ignore has %d flags for %d true boxes" % (len(ignore), len(true_boxes)))
        for c in np.union1d(pred_classes, true_classes):
            self._add_class(int(c), pred_boxes[pred_classes == c], pred_scores[pred_classes == c],
                            true_boxes[true_classes == c], ignore[true_classes == c])
        self.n_images += 1

    def _add_class(self, c, boxes, scores, gt_boxes, gt_ignore):
        gt_order = np.argsort(gt_ignore, kind="mergesort")
        gt_boxes, gt_ignore = gt_boxes[gt_order], gt_ignore[gt_order]
        order = np.argsort(-scores, kind="mergesort")[:self.max_dets]
        boxes, scores = boxes[order], scores[order]
        matched, ignored = _match(box_iou(boxes, gt_boxes), gt_ignore, self.iou_thresholds)
        self._n_true[c] += int((~gt_ignore).sum())
        self._scores[c].append(scores)
        self._matched[c].append(matched)
        self._ignored[c].append(ignored)

    def _pooled(self, c):
        """Scores, matched, ignored (T, D) of class c over all images."""
        t = len(self.iou_thresholds)
        if not self._scores[c]:
            return np.zeros(0), np.zeros((t, 0), bool), np.zeros((t, 0), bool)
        return (np.concatenate(self._scores[c]), np.concatenate(self._matched[c], axis=1),
                np.concatenate(self._ignored[c], axis=1))

    def result(self):
        """JSON-able summary; mAP entries are None when no class has a true box."""
        per_class = {}
        ap = []
        all_scores, all_tp, all_fp = [], [], []
        for c in range(self.num_classes):
            scores, matched, ignored = self._pooled(c)
            order = np.argsort(-scores, kind="mergesort")
            matched, ignored = matched[:, order], ignored[:, order]
            tp, fp = matched & ~ignored, ~matched & ~ignored
            n_true = int(self._n_true[c])
            entry = {"ap50": None, "ap50_95": None, "n_true": n_true}
            if n_true > 0:
                aps = [_average_precision(tp[t], fp[t], n_true)
                       for t in range(len(self.iou_thresholds))]
                entry["ap50"] = aps[self._t50]
                entry["ap50_95"] = float(np.mean(aps))
                ap.append(aps)
            per_class[self.class_names[c]] = entry
            all_scores.append(scores[order])
            all_tp.append(tp[self._t50])
            all_fp.append(fp[self._t50])
        ap = np.asarray(ap, dtype=np.float64)
        n_true = int(self._n_true.sum())
        precision, recall, threshold = _best_f1(np.concatenate(all_scores),
                                                np.concatenate(all_tp), np.concatenate(all_fp),
                                                n_true)
        return {
            "primary": "map50",
            "map50": float(ap[:, self._t50].mean()) if len(ap) else None,
            "map50_95": float(ap.mean()) if len(ap) else None,
            "per_class": per_class,
            "precision": precision,
            "recall": recall,
            "score_threshold": threshold,
            "n": self.n_images,
            "n_true": n_true,
        }
