"""Object detection on the device: thresholds + NMS in numpy, COCO mAP, COCO json predictions.

The exported model decodes its boxes in the graph and outputs `boxes` (N, A, 4) xyxy in input
(letterboxed) pixels and `scores` (N, A, C); runtime/nms.postprocess turns each image's anchors
into detections. A model exported with `--nms trt` outputs EfficientNMS_TRT's `num_dets`,
`det_boxes`, `det_scores`, `det_classes` instead: NMS already ran in the engine with the
thresholds fixed at export, so decode only keeps the first num_dets, drops those under the score
threshold and caps them at max_det.

Two sets of thresholds (rsedge.* metadata, defaults in brackets): deployment, `conf_threshold`
(0.25) / `iou_threshold` (0.45), what a user of the detector gets and what the agreement between
two runs compares; evaluation, `eval_conf_threshold` (0.001) / `eval_iou_threshold` (0.6), what
mAP is measured with (a low score threshold traces the whole precision-recall curve). decode()
takes `mode="eval"` (the default, because every generic caller of decode, the evaluation loops
of evaluate.py and the host's ONNX evaluation, scores what it decodes) or `mode="deploy"`.
`max_det` (300) caps the detections of an image in both.

Scoring is in input pixels: a bundle's targets are stored there (pack_eval_targets), with each
image's LetterboxInfo row. Predictions are clipped to the image's region of the input first (a
box reaching into the padding is cut at the image's edge), so the score equals a COCO evaluation
of the same boxes mapped back to the original image (boxes_to_image clips there), which is what
`--save-predictions` writes: predictions.json (COCO results) and ground_truth.json (COCO).
"""

import collections
import json
import os
import time

import numpy as np

from ..detmetrics import DetectionScore, box_iou
from ..errors import RuntimeToolError
from ..fileio import atomic_write_text
from ..imagefolder import image_files
from ..letterbox import LetterboxInfo, boxes_to_image, letterbox_geometry
from ..nms import postprocess
from ..preprocess import PreprocessSpec
from .base import DeviceTask, eval_file, load_array

DEPLOY_DEFAULTS = {"conf_threshold": 0.25, "iou_threshold": 0.45}
EVAL_DEFAULTS = {"eval_conf_threshold": 0.001, "eval_iou_threshold": 0.6}
DEFAULT_MAX_DET = 300
AGREEMENT_IOU = 0.5
PREDICTIONS_JSON = "predictions.json"
GROUND_TRUTH_JSON = "ground_truth.json"
RAW_OUTPUTS = ("boxes", "scores")
TRT_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")

Detections = collections.namedtuple("Detections", "boxes scores classes")
"""One image's detections: boxes (k, 4) float32 xyxy input pixels, scores (k,) float32, classes (k,) int64."""

DetectionTarget = collections.namedtuple("DetectionTarget", "boxes classes letterbox")
"""One image's ground truth: boxes (K, 4) float32 xyxy input pixels, classes (K,) int64, LetterboxInfo or None."""


def thresholds(metadata, mode="eval"):
    """(score threshold, NMS IoU threshold, max detections per image) for mode "eval" or "deploy"."""
    meta = metadata or {}
    if mode == "eval":
        conf = meta.get("eval_conf_threshold", EVAL_DEFAULTS["eval_conf_threshold"])
        iou = meta.get("eval_iou_threshold", EVAL_DEFAULTS["eval_iou_threshold"])
    elif mode == "deploy":
        conf = meta.get("conf_threshold", DEPLOY_DEFAULTS["conf_threshold"])
        iou = meta.get("iou_threshold", DEPLOY_DEFAULTS["iou_threshold"])
    else:
        raise ValueError("detection thresholds mode must be 'eval' or 'deploy', got {!r}".format(mode))
    max_det = meta.get("max_det")
    return float(conf), float(iou), int(DEFAULT_MAX_DET if max_det is None else max_det)


def pack_eval_targets(boxes_list, classes_list, infos):
    """A bundle's detection targets, one entry per image: boxes (K_i, 4) xyxy in input pixels,
    classes (K_i,), LetterboxInfo (or its row) -> {"boxes": (M, 4) float32, "classes": (M,) int64,
    "counts": (N,) int64, "letterbox": (N, 5) float64}; saved as eval/<key>.npy."""
    if not len(boxes_list) == len(classes_list) == len(infos):
        raise ValueError("{} box lists, {} class lists and {} letterbox infos".format(
            len(boxes_list), len(classes_list), len(infos)))
    boxes, classes, counts, rows = [], [], [], []
    for i, (b, c, info) in enumerate(zip(boxes_list, classes_list, infos)):
        b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
        c = np.asarray(c, dtype=np.int64).reshape(-1)
        if len(b) != len(c):
            raise ValueError("image {}: {} boxes but {} classes".format(i, len(b), len(c)))
        if len(c) and int(c.min()) < 0:
            raise ValueError("image {}: negative class id".format(i))
        boxes.append(b)
        classes.append(c)
        counts.append(len(b))
        rows.append(info.as_row() if isinstance(info, LetterboxInfo) else [float(v) for v in info])
    return {"boxes": np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
            "classes": np.concatenate(classes) if classes else np.zeros((0,), np.int64),
            "counts": np.asarray(counts, dtype=np.int64),
            "letterbox": np.asarray(rows, dtype=np.float64).reshape(-1, 5)}


def unpack_eval_targets(boxes, classes, counts, letterbox, limit=None):
    """The inverse of pack_eval_targets: a list of DetectionTarget, the first `limit` images only when given."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    rows = np.asarray(letterbox, dtype=np.float64).reshape(-1, 5)
    total = int(counts.sum())
    if len(rows) != len(counts) or len(boxes) != total or len(classes) != total or np.any(counts < 0):
        raise RuntimeToolError("the detection evaluation set is inconsistent: counts.npy sums to {} boxes over {} "
                               "images, boxes.npy holds {}, classes.npy {}, letterbox.npy {} rows".format(
                                   total, len(counts), len(boxes), len(classes), len(rows)))
    n = len(counts) if not limit else min(len(counts), int(limit))
    ends = np.cumsum(counts[:n])
    out = []
    for i in range(n):
        lo, hi = int(ends[i] - counts[i]), int(ends[i])
        out.append(DetectionTarget(np.asarray(boxes[lo:hi], dtype=np.float32).reshape(-1, 4),
                                   np.asarray(classes[lo:hi], dtype=np.int64).reshape(-1),
                                   LetterboxInfo.from_row(rows[i])))
    return out


def as_target(target):
    """A DetectionTarget from what a caller holds for one image: a DetectionTarget, a tuple (boxes,
    classes[, LetterboxInfo]), {"boxes", "classes"[, "letterbox"]} or the host's (K, 5) rows [cls, x1,
    y1, x2, y2] (an array, or a list of rows: a list is never read as (boxes, classes))."""
    if isinstance(target, DetectionTarget):
        return target
    if isinstance(target, dict):
        target = (target["boxes"], target["classes"], target.get("letterbox"))
    if isinstance(target, tuple) and len(target) in (2, 3):
        info = target[2] if len(target) == 3 else None
        if info is not None and not isinstance(info, LetterboxInfo):
            info = LetterboxInfo.from_row(info)
        return DetectionTarget(np.asarray(target[0], dtype=np.float32).reshape(-1, 4),
                               np.asarray(target[1], dtype=np.int64).reshape(-1), info)
    rows = np.asarray(target, dtype=np.float64)
    if rows.size == 0 or (rows.ndim == 2 and rows.shape[1] == 5):
        rows = rows.reshape(-1, 5)
        return DetectionTarget(rows[:, 1:5].astype(np.float32), rows[:, 0].astype(np.int64), None)
    raise RuntimeToolError("a detection target is (boxes, classes) or a (K, 5) [cls, x1, y1, x2, y2] array, got "
                           "shape {}".format(rows.shape))


def clip_to_image(boxes, info):
    """Boxes in input pixels cut at the edges of the image's region of the letterboxed input."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if info is None or not len(boxes):
        return boxes
    x0, y0 = float(info.pad_x), float(info.pad_y)
    x1, y1 = x0 + info.width * info.scale, y0 + info.height * info.scale
    out = boxes.copy()
    out[:, 0::2] = np.clip(out[:, 0::2], x0, x1)
    out[:, 1::2] = np.clip(out[:, 1::2], y0, y1)
    return out


class DetectionAccumulator(object):
    """detmetrics.DetectionScore fed image by image; result(): primary "map50", "map50_95",
    "per_class" (ap50, ap50_95, n_true), "precision", "recall" (best-F1 point at IoU 0.5), "n"."""

    def __init__(self, class_names):
        self.score = DetectionScore(len(class_names), class_names=list(class_names))

    def add(self, detections, target):
        target = as_target(target)
        boxes, scores, classes = detections
        self.score.add(clip_to_image(boxes, target.letterbox), scores, classes, target.boxes, target.classes)

    def update(self, predictions, targets):
        if len(predictions) != len(targets):
            raise RuntimeToolError("{} predictions for {} targets".format(len(predictions), len(targets)))
        for detections, target in zip(predictions, targets):
            self.add(detections, target)

    def result(self):
        return self.score.result()


def _max_matching(adjacent):
    """The size of a maximum matching of the bipartite graph adjacent (n, m) bool (augmenting paths)."""
    owner = [-1] * adjacent.shape[1]

    def augment(i, seen):
        for j in np.nonzero(adjacent[i])[0]:
            if not seen[j]:
                seen[j] = True
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(1 for i in range(adjacent.shape[0]) if augment(i, [False] * adjacent.shape[1]))


def _perfect_matching(adjacent):
    """Whether the bipartite graph adjacent (n, n) bool has a perfect matching."""
    return _max_matching(adjacent) == adjacent.shape[0]


def matched_detections(a, b, iou_threshold=AGREEMENT_IOU):
    """How many of two images' detections pair up one to one, each pair the same class with IoU >=
    iou_threshold (a maximum matching, not a greedy one)."""
    if not len(a.classes) or not len(b.classes):
        return 0
    adjacent = (box_iou(a.boxes, b.boxes) >= iou_threshold) & (a.classes[:, None] == b.classes[None, :])
    return _max_matching(adjacent)


def detections_match(a, b, iou_threshold=AGREEMENT_IOU):
    """Whether two images' detections pair one to one, each pair the same class with IoU >= iou_threshold."""
    if len(a.classes) != len(b.classes):
        return False
    if not len(a.classes):
        return True
    adjacent = (box_iou(a.boxes, b.boxes) >= iou_threshold) & (a.classes[:, None] == b.classes[None, :])
    if not (adjacent.any(axis=0).all() and adjacent.any(axis=1).all()):
        return False
    return _perfect_matching(adjacent)


def _coco_box(box):
    x1, y1, x2, y2 = (float(v) for v in box)
    return [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]


class CocoWriter(object):
    """--save-predictions for detection: predictions.json (COCO results: image_id, category_id, bbox
    [x, y, w, h] in original image pixels, score) and ground_truth.json (the COCO dataset they were
    scored against). Image ids are the evaluation index + 1 and category ids the class index + 1;
    a bundle keeps no file names, so file_name is "eval_<index>"."""

    def __init__(self, directory, class_names, input_size):
        self.directory = directory
        self.class_names = list(class_names)
        self.input_size = input_size
        self.results, self.images, self.annotations = [], [], []
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise RuntimeToolError("cannot create {}: {}".format(directory, e)) from e

    def _to_image(self, boxes, info):
        if info is None:
            h, w = self.input_size
            info = LetterboxInfo(h, w, 1.0, 0, 0)
        return boxes_to_image(boxes, info), info

    def add(self, index, detections, target):
        image_id = int(index) + 1
        boxes, info = self._to_image(detections.boxes, target.letterbox)
        for box, score, cls in zip(boxes, detections.scores, detections.classes):
            self.results.append({"image_id": image_id, "category_id": int(cls) + 1, "bbox": _coco_box(box),
                                 "score": float(score)})
        self.images.append({"id": image_id, "width": info.width, "height": info.height,
                            "file_name": "eval_{:05d}".format(int(index))})
        for box, cls in zip(self._to_image(target.boxes, info)[0], target.classes):
            bbox = _coco_box(box)
            self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id,
                                     "category_id": int(cls) + 1, "bbox": bbox, "area": bbox[2] * bbox[3],
                                     "iscrowd": 0})

    def finish(self):
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(self.class_names)]
        gt = {"images": self.images, "annotations": self.annotations, "categories": categories}
        paths = {}
        for key, name, doc in (("predictions", PREDICTIONS_JSON, self.results),
                               ("ground_truth", GROUND_TRUTH_JSON, gt)):
            paths[key] = os.path.join(self.directory, name)
            atomic_write_text(paths[key], json.dumps(doc) + "\n")
        return dict(paths, dir=self.directory, detections=len(self.results), images=len(self.images))


def read_yolo_labels(path, height, width):
    """(boxes (K, 4) float32 xyxy original pixels, classes (K,) int64, malformed line count) of a YOLO
    txt file (one `cls cx cy w h` a line, normalized to 0..1); boxes clipped to the image."""
    boxes, classes, bad = [], [], 0
    with open(path, "r") as f:
        lines = f.read().splitlines()
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(v) for v in parts]
        except ValueError:
            values = []
        if len(values) != 5 or values[0] != int(values[0]) or not np.all(np.isfinite(values)):
            bad += 1
            continue
        c, cx, cy, w, h = values
        boxes.append(((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height))
        classes.append(int(c))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
    return boxes.astype(np.float32), np.asarray(classes, dtype=np.int64), bad


def yolo_label_path(image_path):
    """The YOLO label file of an image: a .txt beside it, else the same sub-path under the sibling
    `labels/` of its nearest `images/` ancestor; None when neither exists."""
    stem = os.path.splitext(image_path)[0]
    if os.path.isfile(stem + ".txt"):
        return stem + ".txt"
    parts = stem.split(os.sep)
    for k in range(len(parts) - 2, -1, -1):
        if parts[k].lower() == "images":
            candidate = os.sep.join(parts[:k] + ["labels"] + parts[k + 1:]) + ".txt"
            return candidate if os.path.isfile(candidate) else None
    return None


def _image_hw(path):
    from ..masks import image_size

    try:
        return image_size(path)
    except ImportError:
        from ..preprocess import load_image

        return load_image(path).shape[:2]


class DetectionTask(DeviceTask):
    name = "detection"
    outputs = RAW_OUTPUTS
    targets_name = "boxes"

    def _named(self, outputs):
        """("trt" | "raw", the outputs in that style's order), by name or, unnamed, by their count."""
        if all(name in outputs for name in TRT_OUTPUTS):
            return "trt", [outputs[name] for name in TRT_OUTPUTS]
        if all(name in outputs for name in RAW_OUTPUTS):
            return "raw", [outputs[name] for name in RAW_OUTPUTS]
        values = list(outputs.values())
        if len(values) in (2, 4):
            return ("raw" if len(values) == 2 else "trt"), values
        raise RuntimeToolError("a detection model outputs boxes and scores (or EfficientNMS_TRT's num_dets, "
                               "det_boxes, det_scores, det_classes), this one gives {}".format(", ".join(outputs)))

    def decode(self, outputs, metadata, mode="eval"):
        """{output name: array} -> [Detections per image], in input pixels, with the thresholds of
        `mode` ("eval": mAP's, the default; "deploy": a user's); see the module docstring."""
        conf, iou, max_det = thresholds(metadata, mode)
        style, arrays = self._named(outputs)
        if style == "trt":
            return self._decode_trt(arrays, conf, max_det)
        boxes, scores = (np.asarray(a) for a in arrays)
        if boxes.ndim != 3 or boxes.shape[2] != 4 or scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
            raise RuntimeToolError("detection outputs must be boxes (N, A, 4) and scores (N, A, C), got {} and "
                                   "{}".format(boxes.shape, scores.shape))
        classes = (metadata or {}).get("classes")
        if classes and scores.shape[2] != len(classes):
            raise RuntimeToolError("the model scores {} classes but its metadata names {}".format(
                scores.shape[2], len(classes)))
        return [Detections(*postprocess(boxes[i], scores[i], conf, iou, max_det)) for i in range(boxes.shape[0])]

    def _decode_trt(self, arrays, conf, max_det):
        num, boxes, scores, classes = (np.asarray(a) for a in arrays)
        out = []
        for i in range(boxes.shape[0]):
            k = int(np.clip(num[i].reshape(-1)[0], 0, boxes.shape[1]))
            s = scores[i, :k].astype(np.float32)
            order = np.argsort(-s, kind="mergesort")
            order = order[s[order] >= conf][:max_det]
            out.append(Detections(boxes[i, order].astype(np.float32).reshape(-1, 4), s[order],
                                  classes[i, order].astype(np.int64)))
        return out

    def accumulator(self, metadata):
        classes = metadata.get("classes")
        if not classes:
            raise RuntimeToolError("the detection model carries no rsedge.classes: cannot score its boxes")
        return DetectionAccumulator(classes)

    def agreement(self, reference, candidate, metadata):
        """The F1 of one run's deployment-threshold detections against the other's, pooled over the
        images: 2 x pairs / (detections of both), a pair being the same class at IoU >= 0.5 in a
        one-to-one matching per image (1.0 when neither run detects anything). A box per image, not an
        image, is the unit: an INT8 run that moves one low-confidence box across the threshold in
        every image still agrees on all the others."""
        a = self.decode(reference, metadata, mode="deploy")
        b = self.decode(candidate, metadata, mode="deploy")
        if len(a) != len(b):
            raise RuntimeToolError("{} images against {}".format(len(a), len(b)))
        total = sum(len(x.classes) + len(y.classes) for x, y in zip(a, b))
        if not total:
            return 1.0
        return 2.0 * sum(matched_detections(x, y) for x, y in zip(a, b)) / total

    def load_targets(self, bundle_dir, entry, limit=None):
        arrays = [load_array(eval_file(bundle_dir, entry, key)) for key in ("boxes", "classes", "counts",
                                                                             "letterbox")]
        return unpack_eval_targets(*arrays, limit=limit)

    def evaluate(self, loop, images, targets, options):
        """mAP of fixed-size letterboxed images (a bundle's eval set) at the evaluation thresholds.

        Beside the metrics: "thresholds" used, "postprocess_ms" (decode + NMS per image at the
        deployment thresholds: what a deployed detector pays after inference), "postprocess_eval_ms"
        (the same at the evaluation thresholds) and "preprocess_ms" (letterbox + normalize of an image
        of the set's median original size, file decoding not included); "predictions" when saved."""
        meta = loop.metadata
        if images.shape[0] != len(targets):
            raise RuntimeToolError("{} images but {} box lists".format(images.shape[0], len(targets)))
        score = self.accumulator(meta)
        writer = None
        if options.save_predictions:
            writer = CocoWriter(options.save_predictions, meta["classes"], _input_size(meta, images))
        spent = {"eval": 0.0, "deploy": 0.0}
        options.log("evaluating {} images ({})".format(images.shape[0], self.describe(meta)))
        for start, stop, outputs in loop.chunks(images):
            if options.observe is not None:
                options.observe(start, outputs)
            chunk = [as_target(t) for t in targets[start:stop]]
            t0 = time.perf_counter()
            self.decode(outputs, meta, mode="deploy")
            t1 = time.perf_counter()
            predictions = self.decode(outputs, meta, mode="eval")
            spent["deploy"] += t1 - t0
            spent["eval"] += time.perf_counter() - t1
            score.update(predictions, chunk)
            if writer is not None:
                for k, (detections, target) in enumerate(zip(predictions, chunk)):
                    writer.add(start + k, detections, target)
        n = max(1, images.shape[0])
        conf, iou, max_det = thresholds(meta, "eval")
        result = dict(score.result(), task=self.name, postprocess_ms=1000.0 * spent["deploy"] / n,
                      postprocess_eval_ms=1000.0 * spent["eval"] / n,
                      thresholds={"eval": {"conf": conf, "iou": iou, "max_det": max_det},
                                  "deploy": dict(zip(("conf", "iou", "max_det"), thresholds(meta, "deploy")))})
        result["preprocess_ms"] = _preprocess_ms(meta, loop.input.shape, targets)
        if writer is not None:
            result["predictions"] = writer.finish()
        return result

    def folder_items(self, folder, metadata):
        """Images anywhere under `folder` with YOLO txt labels (a .txt beside each image, or images/ and
        labels/ trees; `cls cx cy w h` normalized): targets in the letterboxed input's pixels."""
        meta = dict(metadata)
        if meta.get("resize", "letterbox") != "letterbox":
            raise RuntimeToolError("detection folders are evaluated with letterboxed inputs, but the model says "
                                   "rsedge.resize {!r}".format(meta["resize"]))
        meta["resize"] = "letterbox"
        if not meta.get("input_size") or not meta.get("classes"):
            raise RuntimeToolError("evaluating a detector on a folder needs its rsedge.input_size and rsedge.classes "
                                   "metadata")
        if not os.path.isdir(folder):
            raise RuntimeToolError("evaluation folder {} does not exist".format(folder))
        paths = [os.path.join(folder, *rel.split("/")) for rel in image_files(folder)]
        labels = [yolo_label_path(p) for p in paths]
        if not any(labels):
            raise RuntimeToolError("no YOLO labels found for the {} images under {} (expected a .txt beside each "
                                   "image, or images/ and labels/ trees)".format(len(paths), folder))
        items, problems = [], collections.Counter()
        for path, label in zip(paths, labels):
            target = self._folder_target(path, label, meta, problems)
            if target is not None:
                items.append((path, target))
        return items, meta, _folder_note(problems)

    def _folder_target(self, path, label, meta, problems):
        try:
            h, w = _image_hw(path)
        except Exception:  # noqa: BLE001 - any reader failure means the image is unusable
            problems["unreadable images (skipped)"] += 1
            return None
        boxes, classes = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        if label is None:
            problems["images without labels (background)"] += 1
        else:
            boxes, classes, bad = read_yolo_labels(label, h, w)
            problems["malformed label lines (skipped)"] += bad
            ok = (classes >= 0) & (classes < len(meta["classes"]))
            ok &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            problems["boxes with an unknown class or no area (dropped)"] += int((~ok).sum())
            boxes, classes = boxes[ok], classes[ok]
        info = letterbox_geometry(h, w, meta["input_size"])[2]
        scaled = boxes.astype(np.float64) * info.scale + np.array([info.pad_x, info.pad_y] * 2, np.float64)
        return DetectionTarget(scaled.astype(np.float32).reshape(-1, 4), classes, info)

    def summary(self, result):
        if result.get("map50") is None:
            return None
        line = "mAP@0.5 {:.2f} %, mAP@0.5:0.95 {:.2f} % on {} images".format(
            100.0 * result["map50"], 100.0 * result["map50_95"], result["n"])
        if result.get("postprocess_ms") is not None:
            line += "; per image on the host CPU: decode + NMS {:.2f} ms (deployment thresholds)".format(
                result["postprocess_ms"])
            if result.get("preprocess_ms") is not None:
                line += ", letterbox + normalize {:.2f} ms".format(result["preprocess_ms"])
        return line

    def describe(self, metadata):
        conf, iou, _ = thresholds(metadata, "eval")
        size = metadata.get("input_size") or ("?", "?")
        return "{} classes, input {}x{}, score >= {:g}, NMS IoU {:g}".format(
            len(metadata.get("classes") or ()), size[0], size[1], conf, iou)


def _folder_note(problems):
    counted = ["{} {}".format(n, what) for what, n in sorted(problems.items()) if n]
    return "; ".join(counted) if counted else None


def _input_size(meta, images):
    size = meta.get("input_size")
    if size:
        return int(size[0]), int(size[1])
    return int(images.shape[2]), int(images.shape[3])


def _preprocess_ms(meta, input_shape, targets, repeats=3):
    """Mean milliseconds of letterbox + normalize of one image of the set's median original size."""
    infos = [t.letterbox for t in (as_target(x) for x in targets[:200]) if t.letterbox is not None]
    if not infos:
        return None
    spec = PreprocessSpec.from_metadata(dict(meta, resize="letterbox"), input_shape)
    h = int(np.median([i.height for i in infos]))
    w = int(np.median([i.width for i in infos]))
    image = np.random.RandomState(0).randint(0, 256, size=(h, w, 3)).astype(np.uint8)
    spec(image)
    t0 = time.perf_counter()
    for _ in range(repeats):
        spec(image)
    return 1000.0 * (time.perf_counter() - t0) / repeats
