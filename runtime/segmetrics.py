"""Semantic segmentation metrics, one numpy implementation for the host and the device.

Pixel metrics come from one confusion matrix (rows = truth, columns = prediction) summed over
every evaluated image: global (pixel) accuracy, mean class accuracy, per-class and mean IoU,
frequency-weighted IoU. Pixels whose truth is the ignore label (or any value >= the class count)
are not counted anywhere.

Boundary F1 (the BF contour matching score of Csurka, Larlus and Perronnin, BMVC 2013, as
MATLAB's `bfscore` and `evaluateSemanticSegmentation` compute it) is per image and per class:

- The boundary of a class in a label map is the set of its pixels that have a 4-neighbour of
  another class (MATLAB's `bwperim` of the class mask). Only labelled pixels take part: a pixel
  whose truth is the ignore label is never a boundary pixel, neither of the prediction nor of the
  truth, and a labelled pixel next to one is not a boundary pixel because of it; the image border
  is not a boundary either (a class filling the image has no contour).
- Precision = the fraction of predicted boundary pixels within Euclidean distance `tolerance`
  (<=, in pixels) of a true boundary pixel of the same class; recall = the fraction of true
  boundary pixels within `tolerance` of a predicted one; BF = 2PR / (P + R) (0 when P + R = 0).
- A class absent (over the labelled pixels) from both the prediction and the truth of an image is
  skipped; present in only one of them its BF is 0. Present in both: when neither has a boundary
  pixel (both fill the labelled area) its BF is 1, when only one has, 0.
- Default tolerance: 0.75 % of the image diagonal, MATLAB's default (a 2000 x 2000 tile: 21.2
  px; a 512 x 512 patch: 5.4 px; below 1 px only coinciding boundary pixels match).
- The image's BF is the mean over its scored classes; the data set's mean BF is the mean over
  images (MATLAB's MeanBFScore of the data set metrics). Images with no labelled pixel are not
  counted. Per class, "bf" is the mean over the images where the class was scored.

Distances are exact, with numpy only: for each row the distance to the nearest boundary pixel in
that row is found with two cumulative max/min passes, then a pixel (y, x) is within `tolerance`
of the boundary iff some row y + dy (|dy| <= tolerance) has one within
floor(sqrt(tolerance^2 - dy^2)) columns; this is evaluated only at the other map's boundary
pixels, so a 2000 x 2000 tile with 6 classes takes about a second.
"""

import math

import numpy as np

DEFAULT_IGNORE_INDEX = 255
DEFAULT_BF_TOLERANCE = 0.0075  # of the image diagonal (MATLAB's bfscore default)


def _valid(truth, num_classes, ignore_index):
    truth = np.asarray(truth)
    valid = (truth >= 0) & (truth < num_classes)
    if ignore_index is not None:
        valid &= truth != ignore_index
    return valid


def confusion(truth, pred, num_classes, ignore_index=DEFAULT_IGNORE_INDEX):
    """(C, C) int64 pixel counts, rows = truth, columns = prediction; pixels whose truth is
    ignore_index or outside 0..C-1 are not counted. A predicted class outside 0..C-1 on a counted
    pixel is an error (the model has more outputs than the metadata names classes)."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError("prediction shape {} differs from the mask's {}".format(pred.shape, truth.shape))
    c = int(num_classes)
    valid = _valid(truth, c, ignore_index)
    t = truth[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= c):
        raise ValueError("predicted class {} outside 0..{} (the model has more classes than its metadata "
                         "names?)".format(int(p.max() if p.max() >= c else p.min()), c - 1))
    return np.bincount(t * c + p, minlength=c * c).reshape(c, c)


def _ratio(num, den):
    return float(num) / float(den) if den else None


def _mean(values):
    values = [v for v in values if v is not None]
    return float(sum(values)) / len(values) if values else None


def class_name(class_names, index):
    if class_names is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return str(index)


def scores_from_confusion(cm, class_names=None):
    """Pixel metrics of a confusion matrix (rows = truth), fractions 0..1 as Python floats (None where
    undefined): global_accuracy, mean_accuracy (mean recall over classes present in the truth),
    miou (mean IoU over classes whose union of truth and prediction is not empty), fwiou (IoU
    weighted by each class's share of the true pixels), per_class {name: {"iou", "accuracy",
    "pixels" (true pixels)}}."""
    cm = np.asarray(cm, dtype=np.int64)
    total = int(cm.sum())
    tp = np.diag(cm)
    rows, cols = cm.sum(axis=1), cm.sum(axis=0)
    union = rows + cols - tp
    per_class = {}
    ious, accs, fw = [], [], 0.0
    for k in range(cm.shape[0]):
        iou = _ratio(tp[k], union[k])
        acc = _ratio(tp[k], rows[k])
        per_class[class_name(class_names, k)] = {"iou": iou, "accuracy": acc, "pixels": int(rows[k])}
        ious.append(iou)
        accs.append(acc)
        if iou is not None and total:
            fw += float(rows[k]) / total * iou
    return {"global_accuracy": _ratio(int(tp.sum()), total), "mean_accuracy": _mean(accs), "miou": _mean(ious),
            "fwiou": fw if total else None, "per_class": per_class}


def _label_map(labels, valid):
    """Labels as int32 with -1 where the pixel is not counted."""
    return np.where(valid, np.asarray(labels).astype(np.int32), np.int32(-1))


def boundary_map(labels):
    """Boolean map of boundary pixels of a label map (-1 = not labelled): labelled pixels with a
    labelled 4-neighbour of another label."""
    valid = labels >= 0
    edge = np.zeros(labels.shape, dtype=bool)
    d = (labels[:, 1:] != labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    edge[:, 1:] |= d
    edge[:, :-1] |= d
    d = (labels[1:] != labels[:-1]) & valid[1:] & valid[:-1]
    edge[1:] |= d
    edge[:-1] |= d
    return edge


def _row_distance(boundary, reach):
    """For each pixel, the column distance to the nearest True pixel of its row (> reach where none)."""
    w = boundary.shape[1]
    big = w + int(reach) + 2
    dtype = np.int16 if big + w < 32767 else np.int32
    big = dtype(big)
    idx = np.arange(w, dtype=dtype)
    left = np.where(boundary, idx, -big)
    np.maximum.accumulate(left, axis=1, out=left)
    np.subtract(idx, left, out=left)
    right = np.where(boundary, idx, big + w)[:, ::-1]
    right = np.minimum.accumulate(right, axis=1)[:, ::-1]
    np.subtract(right, idx, out=right)
    return np.minimum(left, right, out=left)


def near_boundary(ys, xs, boundary, tolerance):
    """For the points (ys, xs): is a True pixel of `boundary` within Euclidean distance <= tolerance?"""
    ys, xs = np.asarray(ys, dtype=np.int64), np.asarray(xs, dtype=np.int64)
    if not ys.size:
        return np.zeros(0, dtype=bool)
    r = int(math.floor(tolerance + 1e-9)) if tolerance > 0 else 0
    if r == 0:
        return boundary[ys, xs].copy()
    h, w = boundary.shape
    y0, y1 = max(0, int(ys.min()) - r), min(h, int(ys.max()) + r + 1)
    x0, x1 = max(0, int(xs.min()) - r), min(w, int(xs.max()) + r + 1)
    crop = boundary[y0:y1, x0:x1]
    if not crop.any():
        return np.zeros(ys.shape, dtype=bool)
    dist = _row_distance(crop, r)
    qy, qx = ys - y0, xs - x0
    hit = np.zeros(ys.shape, dtype=bool)
    tol2 = float(tolerance) * float(tolerance)
    for dy in range(-r, r + 1):
        reach = int(math.floor(math.sqrt(max(tol2 - dy * dy, 0.0)) + 1e-9))
        rows = qy + dy
        inside = (rows >= 0) & (rows < crop.shape[0]) & ~hit
        if inside.any():
            hit[inside] |= dist[rows[inside], qx[inside]] <= reach
    return hit


def _class_bf(tb, pb, tolerance):
    """BF of one class present in both maps, from its boundary points (ys, xs) in truth and prediction."""
    nt, np_ = tb[0].size, pb[0].size
    if nt == 0 and np_ == 0:
        return 1.0
    if nt == 0 or np_ == 0:
        return 0.0
    shape = (int(max(tb[0].max(), pb[0].max())) + 1, int(max(tb[1].max(), pb[1].max())) + 1)
    tmap = np.zeros(shape, dtype=bool)
    tmap[tb] = True
    pmap = np.zeros(shape, dtype=bool)
    pmap[pb] = True
    precision = float(np.count_nonzero(near_boundary(pb[0], pb[1], tmap, tolerance))) / np_
    recall = float(np.count_nonzero(near_boundary(tb[0], tb[1], pmap, tolerance))) / nt
    return 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def default_tolerance(height, width, fraction=DEFAULT_BF_TOLERANCE):
    """The BF distance tolerance in pixels: `fraction` of the image diagonal."""
    return float(fraction) * math.sqrt(float(height) ** 2 + float(width) ** 2)


def boundary_f1(truth, pred, num_classes, tolerance=None, ignore_index=DEFAULT_IGNORE_INDEX):
    """{class index: BF} of one image (see the module docstring), classes absent from both left out.

    tolerance: in pixels; None: 0.75 % of the image diagonal."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape or truth.ndim != 2:
        raise ValueError("boundary F1 needs two (H, W) maps of one shape, got {} and {}".format(pred.shape,
                                                                                            truth.shape))
    if tolerance is None:
        tolerance = default_tolerance(*truth.shape)
    valid = _valid(truth, int(num_classes), ignore_index)
    t, p = _label_map(truth, valid), _label_map(pred, valid)
    t_edge, p_edge = boundary_map(t), boundary_map(p)
    tys, txs = np.nonzero(t_edge)
    pys, pxs = np.nonzero(p_edge)
    t_lab, p_lab = t[tys, txs], p[pys, pxs]
    t_present = np.bincount(t[valid], minlength=num_classes)[:num_classes] > 0
    p_present = np.bincount(np.clip(p[valid], 0, None), minlength=num_classes)[:num_classes] > 0
    scores = {}
    for k in range(int(num_classes)):
        if not t_present[k] and not p_present[k]:
            continue
        if t_present[k] != p_present[k]:
            scores[k] = 0.0
            continue
        tk, pk = t_lab == k, p_lab == k
        scores[k] = _class_bf((tys[tk], txs[tk]), (pys[pk], pxs[pk]), tolerance)
    return scores


class SegScore(object):
    """Running segmentation metrics over images of any size; result() is JSON-able.

    update(pred, truth): (N, H, W) arrays or lists of (H, W) arrays (sizes may differ per image).
    bf_tolerance: the BF distance tolerance as a fraction of each image's diagonal.
    """

    def __init__(self, class_names, ignore_index=DEFAULT_IGNORE_INDEX, bf_tolerance=DEFAULT_BF_TOLERANCE,
                 num_classes=None):
        self.class_names = list(class_names) if class_names is not None else None
        if num_classes is None:
            if self.class_names is None:
                raise ValueError("SegScore needs the class names or num_classes")
            num_classes = len(self.class_names)
        self.num_classes = int(num_classes)
        self.ignore_index = DEFAULT_IGNORE_INDEX if ignore_index is None else int(ignore_index)
        self.bf_tolerance = float(bf_tolerance)
        self.cm = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.bf_images = []
        self.bf_class = [[] for _ in range(self.num_classes)]
        self.n = 0
        self.ignored = 0

    def update(self, pred, truth):
        if len(pred) != len(truth):
            raise ValueError("{} predictions but {} masks".format(len(pred), len(truth)))
        for p, t in zip(pred, truth):
            self.add(p, t)

    def add(self, pred, truth):
        """One image: pred and truth (H, W)."""
        pred, truth = np.asarray(pred), np.asarray(truth)
        cm = confusion(truth, pred, self.num_classes, self.ignore_index)
        self.cm += cm
        self.ignored += int(truth.size - cm.sum())
        self.n += 1
        scores = boundary_f1(truth, pred, self.num_classes, default_tolerance(truth.shape[0], truth.shape[1],
                                                                              self.bf_tolerance),
                             self.ignore_index)
        if scores:
            self.bf_images.append(sum(scores.values()) / len(scores))
        for k, value in scores.items():
            self.bf_class[k].append(value)

    def result(self):
        scores = scores_from_confusion(self.cm, self.class_names)
        for k in range(self.num_classes):
            values = self.bf_class[k]
            scores["per_class"][class_name(self.class_names, k)]["bf"] = (
                float(sum(values)) / len(values) if values else None)
        return {"primary": "miou", "miou": scores["miou"], "global_accuracy": scores["global_accuracy"],
                "mean_accuracy": scores["mean_accuracy"], "fwiou": scores["fwiou"],
                "mean_bf": _mean(self.bf_images), "bf_tolerance": self.bf_tolerance,
                "per_class": scores["per_class"], "confusion": self.cm.tolist(), "n": self.n,
                "pixels": int(self.cm.sum()), "ignored": self.ignored}
