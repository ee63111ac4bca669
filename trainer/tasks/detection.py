"""Object detection: boxes (NWPU VHR-10, YOLO txt, COCO json), a YOLO-style anchor detector,
COCO mAP@0.5 as the primary metric.

Images are letterboxed to the model's square input (runtime/letterbox.py, the device's own
function), so every box on the host lives in input pixels; mAP is invariant to that one scale and
shift, and predictions go back to original pixels only for `--save-predictions`. The model's
forward returns the three raw detection maps (what the loss, Taylor and L_FA read); the predictor
decodes them (det_models.decode, the formula the exported graph holds) and the evaluator keeps
what survives the evaluation thresholds of the paper (confidence 0.001, NMS IoU 0.6) through the
device's numpy post-processing (runtime/nms.py), scored by the one numpy COCO evaluator
(runtime/detmetrics.py) that a test checks against faster-coco-eval.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import Evaluator, LossFn, Task, per_class_lines, percent

EVAL_CONF, EVAL_IOU = 0.001, 0.6  # the paper's evaluation thresholds
DEPLOY_CONF, DEPLOY_IOU = 0.25, 0.45  # what a deployed detector reports
MAX_DET = 300
EXAMPLES = 6  # images an evaluation keeps for the detections figure
TRAIN_METRIC_EVERY = 8  # the running training mAP reads one batch in this many (NMS at 0.001 is not free)


def thresholds(meta: dict[str, Any]) -> dict[str, Any]:
    """The model's post-processing thresholds (metadata keys of the device table)."""
    return {"conf_threshold": float(meta.get("conf_threshold", DEPLOY_CONF)),
            "iou_threshold": float(meta.get("iou_threshold", DEPLOY_IOU)),
            "eval_conf_threshold": float(meta.get("eval_conf_threshold", EVAL_CONF)),
            "eval_iou_threshold": float(meta.get("eval_iou_threshold", EVAL_IOU)),
            "max_det": int(meta.get("max_det", MAX_DET))}


def model_anchors(meta: dict[str, Any]):
    """The anchors (levels, anchors, 2) in input pixels the model was built with."""
    import torch

    from ..det_models import DEFAULT_ANCHORS

    return torch.tensor((meta.get("model_args") or {}).get("anchors") or DEFAULT_ANCHORS, dtype=torch.float32)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def truth_arrays(target: Any) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (K, 4), classes (K,)) of one image's (K, 5) [cls, x1, y1, x2, y2] target."""
    t = _numpy(target).reshape(-1, 5)
    return t[:, 1:5].astype(np.float64), t[:, 0].astype(np.int64)


class DetectionEvaluator(Evaluator):
    """COCO mAP@0.5 / 0.5:0.95, per-class AP, precision and recall at the best-F1 operating point,
    over decoded outputs (boxes, scores) post-processed at the evaluation thresholds; keeps the
    first images' detections (at the deployment threshold) for the figure and, for PR curves,
    every detection at IoU 0.5."""

    def __init__(self, meta: dict[str, Any], every: int = 1, keep_examples: bool = True, decode_raw: bool = False):
        from rsedge.runtime.detmetrics import DetectionScore

        self.classes = list(meta["classes"])
        self.t = thresholds(meta)
        self.score = DetectionScore(len(self.classes), self.classes)
        self.norm = meta["normalization"]
        self.every, self.batches, self.keep_examples = max(1, every), 0, keep_examples
        self.detections: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.truths: list[tuple[np.ndarray, np.ndarray]] = []
        self.examples: list[dict[str, Any]] = []
        self._inputs: list[np.ndarray] = []
        self._cached: dict[str, Any] | None = None
        self._decode = _raw_decoder(meta) if decode_raw else None

    def observe_inputs(self, inputs) -> None:
        self._inputs = [_numpy(x) for x in inputs] if self.keep_examples and len(self.examples) < EXAMPLES else []

    def update(self, outputs, targets) -> None:
        from rsedge.runtime.nms import postprocess

        self.batches += 1
        if (self.batches - 1) % self.every:
            return
        if self._decode is not None:  # a training step's raw maps
            outputs = self._decode(outputs)
        boxes, scores = (_numpy(o) for o in outputs)
        for i, target in enumerate(targets):
            det = postprocess(boxes[i], scores[i], self.t["eval_conf_threshold"], self.t["eval_iou_threshold"],
                              self.t["max_det"])
            truth = truth_arrays(target)
            self.score.add(det[0], det[1], det[2], truth[0], truth[1])
            self.detections.append(det)
            self.truths.append(truth)
            if i < len(self._inputs) and len(self.examples) < EXAMPLES:
                self.examples.append(self._example(self._inputs[i], det, truth))
        self._cached = None

    def _example(self, image: np.ndarray, det, truth) -> dict[str, Any]:
        mean = np.asarray(self.norm["mean"], np.float32)[:, None, None]
        std = np.asarray(self.norm["std"], np.float32)[:, None, None]
        rgb = np.clip((image * std + mean) * 255.0, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        keep = det[1] >= self.t["conf_threshold"]
        return {"image": rgb, "boxes": det[0][keep], "scores": det[1][keep], "classes": det[2][keep],
                "truth_boxes": truth[0], "truth_classes": truth[1]}

    def result(self) -> dict[str, Any]:
        if self._cached is None:
            r = self.score.result()
            self._cached = {**r, "map50": float(r.get("map50") or 0.0), "samples": len(self.truths)}
        return {**self._cached, "examples": self.examples, "detections": self.detections, "truths": self.truths}


def _raw_decoder(meta: dict[str, Any]):
    """decode(raw maps) -> (boxes, scores) with the model's anchors."""
    import torch

    from ..det_models import STRIDES, decode

    anchors = model_anchors(meta)

    def run(raw):
        with torch.no_grad():
            return decode([r.float() for r in raw], anchors.to(raw[0].device), STRIDES)

    return run


def _with_batch_scale(loss_fn):
    """The loss times the batch size, as YOLO-style training scales it, so the usual detector
    learning rate (0.01 with SGD) applies."""

    def scaled(outputs, targets, inputs):
        return loss_fn(outputs, targets) * len(targets)

    scaled.components = loss_fn  # the DetectionLoss, whose `last` holds box / obj / cls
    return scaled


class DetectionTask(Task):
    name = "detection"
    primary_metric = "map50"
    higher_is_better = True
    agreement_name = "detection agreement"
    outputs = ("boxes", "scores")
    record_keys = ("map50", "map50_95", "per_class", "precision", "recall", "score_threshold", "samples",
                   "skipped_images")
    default_lr = {"sgd": 0.01, "adamw": 1e-3}
    ema_by_default = True
    saves_predictions = True
    lfa_every_head = True  # L_FA reads every detection layer (seed 001, eq. 2)

    @staticmethod
    def collate(batch):
        from ..det_datasets import detection_collate

        return detection_collate(batch)

    # -- data ---------------------------------------------------------------------------------
    def eval_dataset(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]):
        from ..det_datasets import DetectionImages

        return DetectionImages(root, items, meta, augment=False)

    def train_dataset(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]):
        from ..det_datasets import DetectionImages

        return DetectionImages(root, items, meta, augment=True, mosaic=float(meta.get("mosaic", 0.0) or 0.0))

    def new_split(self, root: Path, options: Any) -> dict[str, Any]:
        from ..detdata import DetLayout, make_detection_split

        return make_detection_split(root, DetLayout.from_dict(options.layout or {}), val=options.val,
                                    test=options.test, seed=options.seed, progress=options.progress)

    def check_split(self, split: dict[str, Any], root: Path) -> None:
        missing = [rel for part in ("train", "val", "test") for rel, _ in split.get(part, [])
                   if not (Path(split["root"]) / rel).is_file()]
        if missing:
            raise ValueError(f"{len(missing)} image(s) of the split are gone from {split['root']}, e.g. {missing[0]}")

    def scan_folder(self, meta: dict[str, Any], root: Path) -> list:
        from ..datasets import check_classes
        from ..detdata import DetLayout, _json_item, scan_detection

        scan = scan_detection(root, DetLayout.from_dict(meta.get("data_layout") or {}))
        check_classes(meta["classes"], scan.classes, what=f"folder {root}")
        return [_json_item(rel, boxes, classes) for rel, boxes, classes in scan.items]

    def split_meta(self, split: dict[str, Any], options: Any) -> dict[str, Any]:
        mosaic = float(getattr(options, "mosaic", 0.0) or 0.0)
        if not 0 <= mosaic <= 1:
            raise ValueError(f"--mosaic is a probability in [0, 1], not {mosaic}")
        return {"data_layout": split.get("layout") or {}, "mosaic": mosaic,
                "conf_threshold": DEPLOY_CONF, "iou_threshold": DEPLOY_IOU, "eval_conf_threshold": EVAL_CONF,
                "eval_iou_threshold": EVAL_IOU, "max_det": MAX_DET}

    def check_input_size(self, size: Sequence[int]) -> None:
        from ..det_models import check_input_size

        check_input_size(tuple(size))

    def fit_model_args(self, meta: dict[str, Any], train_ds, log) -> dict[str, Any]:
        """Anchors fitted to the training boxes (k-means, then the optional genetic refinement)."""
        from ..anchors import anchor_report, fit_anchors

        args = dict(meta.get("model_args") or {})
        wh = train_ds.boxes_wh()
        generations = int(args.pop("anchor_generations", 0) or 0)
        if len(wh) < 9:
            log(f"warning: {len(wh)} training boxes are too few to fit anchors; keeping the default anchors")
            return args
        anchors = fit_anchors(wh, n=9, input_size=max(meta["input_size"]), generations=generations, seed=0)
        report = anchor_report(wh, anchors)
        how = f"k-means + {generations} genetic generations" if generations else "k-means"
        log(f"anchors fitted to {len(wh)} training boxes ({how}): best possible recall {report['bpr']:.3f}")
        args["anchors"] = np.round(np.asarray(anchors, np.float64), 2).tolist()
        return args

    # -- training and scoring -----------------------------------------------------------------
    def loss(self, outputs, targets, inputs):
        raise TypeError("the detection loss depends on the model's anchors: use task.model_loss(meta)")

    def model_loss(self, meta: dict[str, Any], cfg: Any = None) -> LossFn:
        from ..det_loss import DetectionLoss
        from ..det_models import STRIDES

        loss = DetectionLoss(model_anchors(meta), STRIDES, len(meta["classes"]), tuple(meta["input_size"]))
        return _with_batch_scale(loss)

    def evaluator(self, meta: dict[str, Any]) -> DetectionEvaluator:
        return DetectionEvaluator(meta)

    def training_evaluator(self, meta: dict[str, Any]) -> DetectionEvaluator:
        return DetectionEvaluator(meta, every=TRAIN_METRIC_EVERY, keep_examples=False, decode_raw=True)

    def predictor(self, meta: dict[str, Any]):
        decode = _raw_decoder(meta)
        return lambda model, inputs: decode(model(inputs))

    def eval_batch_size(self, requested: int) -> int:
        return min(requested, 16)

    def summary(self, result: dict[str, Any]) -> str:
        lines = [f"mAP@0.5 {percent(result.get('map50'))}, mAP@0.5:0.95 {percent(result.get('map50_95'))}, "
                 f"precision {percent(result.get('precision'))}, recall {percent(result.get('recall'))} "
                 f"({result.get('samples', 0)} images)"]
        lines += per_class_lines(result.get("per_class") or {}, (("AP50", "ap50"), ("AP50:95", "ap50_95")))
        return "\n".join(lines)

    def write_eval_outputs(self, out: Path, result: dict[str, Any], meta: dict[str, Any], title: str) -> None:
        from ..records import atomic_write_json
        from .det_plots import plot_detections, plot_pr_curves, pr_curves

        keep = {k: v for k, v in result.items() if k not in ("examples", "detections", "truths")}
        atomic_write_json(Path(out) / "metrics.json", keep)
        if result.get("detections") is not None:
            curves = pr_curves(result["detections"], result["truths"], len(meta["classes"]))
            plot_pr_curves(curves, meta["classes"], Path(out) / "pr_curves.png", title)
        if result.get("examples"):
            plot_detections(result["examples"], meta["classes"], Path(out) / "detections.png", title)

    def save_predictions(self, directory: Path, result: dict[str, Any], meta: dict[str, Any], dataset,
                         items: Sequence[Sequence[Any]], log) -> dict[str, Any]:
        """COCO predictions.json (original-image pixels) and the ground_truth.json they were scored
        against, by the device's writer, so host and device files read the same; file names are the
        images' paths under the data folder."""
        from rsedge.runtime.tasks.detection import CocoWriter, Detections, DetectionTarget

        writer = CocoWriter(str(directory), meta["classes"], meta["input_size"])
        for i, (det, truth) in enumerate(zip(result["detections"], result["truths"])):
            writer.add(i, Detections(*det), DetectionTarget(truth[0], truth[1], dataset.info(i)))
        if result.get("skipped_images"):
            log("note: images were skipped as unreadable: the predictions' file names are eval_<index>")
        else:
            for image, item in zip(writer.images, items):
                image["file_name"] = str(item[0])
        return writer.finish()

    # -- compression --------------------------------------------------------------------------
    def target_regions(self, feature_model, images, targets):
        """For each detection layer, the ground-truth boxes as {0,1} masks at the layer's size
        (eq. 1's M): a cell is inside when its centre lies in a box."""
        import torch

        with torch.no_grad():
            _, feats = feature_model(images)
        h, w = images.shape[-2:]
        masks = []
        for feat in feats:
            fh, fw = feat.shape[-2:]
            ys = (torch.arange(fh, dtype=torch.float32) + 0.5) * (h / fh)
            xs = (torch.arange(fw, dtype=torch.float32) + 0.5) * (w / fw)
            level = torch.zeros(len(targets), fh, fw)
            for i, target in enumerate(targets):
                for _, x1, y1, x2, y2 in torch.as_tensor(target, dtype=torch.float32).reshape(-1, 5).tolist():
                    inside_y = (ys >= y1) & (ys <= y2)
                    inside_x = (xs >= x1) & (xs <= x2)
                    level[i] = torch.maximum(level[i], (inside_y[:, None] & inside_x[None, :]).float())
            masks.append(level.to(feat.device))
        return masks

    # -- export and the device ----------------------------------------------------------------
    def device_targets(self, targets: list[Any]) -> list[np.ndarray]:
        """Per-image (K, 5) [cls, x1, y1, x2, y2] rows, which the device accumulator reads."""
        return [_numpy(t).reshape(-1, 5) for t in targets]

    def export_module(self, model, meta: dict[str, Any]):
        from ..det_models import DetectExport

        return DetectExport(model, tuple(meta["input_size"]), anchors=model_anchors(meta))

    def preprocess(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {**super().preprocess(meta), "resize": "letterbox", "pad_value": 114, **thresholds(meta)}

    def bundle_eval(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]
                    ) -> dict[str, Any]:
        """Letterboxed, preprocessed images and their boxes in input pixels, with each image's
        letterbox geometry so the device can write predictions in original pixels."""
        from rsedge.runtime.tasks.detection import pack_eval_targets

        from .base import stack_dataset

        ds = self.eval_dataset(root, items, meta)
        images, targets = stack_dataset(ds, meta["input_size"])
        infos = [ds.info(i) for i in range(len(targets))]
        arrays = [truth_arrays(t) for t in targets]
        packed = pack_eval_targets([a[0] for a in arrays], [a[1] for a in arrays], infos)
        return {"images": images, "targets": {f"{k}.npy": v for k, v in packed.items()}}
