"""Semantic segmentation: images and masks (index or colour-coded), one logit map per class,
mIoU as the primary metric.

Training reads fixed-size windows cut from the tiles with overlap (`SegmentationPatches`,
augmented jointly); every evaluation is over WHOLE images, by sliding windows of the model's
input size with the logits of overlapping windows averaged (runtime/tiling.py, which the device
runs too), scored by the one numpy implementation of the metrics (runtime/segmetrics.py). The
ignore label (255) marks unlabelled pixels and colours in no class: never a class, never scored.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import Evaluator, LossFn, Task, per_class_lines, percent

IGNORE_INDEX = 255
EXAMPLES = 4  # images an evaluation keeps for the overlay figure
CALIBRATION_WINDOWS = 4  # windows per image in calibration / parity / guard sets
# A shuffled epoch visits the windows of every tile in random order, so each DataLoader worker keeps
# every decoded training tile (RGB + mask) of a set this size: decoding a 2000 px JPEG and mapping
# its colour mask costs ~0.3 s, more than the training step of the window it was decoded for.
CACHE_ALL_TILES_UP_TO = 256
LARGE_SET_CACHE = 16


def _tile_cache(items: Sequence[Any]) -> int:
    return len(items) if len(items) <= CACHE_ALL_TILES_UP_TO else LARGE_SET_CACHE


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _per_image(batch: Any) -> list[np.ndarray]:
    """A batch (a tensor with the sample on axis 0, or a list of per-sample tensors) as numpy arrays."""
    return [_numpy(b) for b in batch]


def _predictions(outputs: Any) -> list[np.ndarray]:
    """Class maps (H, W) from logits (N, C, H, W) or a list of (C, H, W)."""
    return [np.argmax(o, axis=0).astype(np.int64) for o in _per_image(outputs)]


class PixelEvaluator(Evaluator):
    """Confusion-matrix metrics only (no boundary F1): the running metric of training batches."""

    def __init__(self, classes: Sequence[str], ignore_index: int = IGNORE_INDEX):
        self.classes, self.ignore_index = list(classes), ignore_index
        self.cm = np.zeros((len(self.classes), len(self.classes)), np.int64)
        self.n = 0

    def update(self, outputs, targets) -> None:
        from rsedge.runtime.segmetrics import confusion

        for pred, truth in zip(_predictions(outputs), _per_image(targets)):
            self.cm += confusion(truth, pred, len(self.classes), self.ignore_index)
            self.n += 1

    def result(self) -> dict[str, Any]:
        from rsedge.runtime.segmetrics import scores_from_confusion

        return {**scores_from_confusion(self.cm, self.classes), "samples": self.n}


class SegmentationEvaluator(Evaluator):
    """Every metric of runtime/segmetrics.SegScore on whole images (mIoU, global and mean class
    accuracy, FWIoU, mean boundary F1, per class, the confusion matrix), and the first few images
    with their true and predicted masks for the overlay figure."""

    def __init__(self, meta: dict[str, Any]):
        from rsedge.runtime.segmetrics import SegScore

        self.score = SegScore(meta["classes"], ignore_index=meta.get("ignore_index", IGNORE_INDEX))
        self.norm = meta["normalization"]
        self.examples: list[dict[str, np.ndarray]] = []
        self._inputs: list[np.ndarray] = []

    def observe_inputs(self, inputs) -> None:
        self._inputs = _per_image(inputs) if len(self.examples) < EXAMPLES else []

    def update(self, outputs, targets) -> None:
        preds, truths = _predictions(outputs), _per_image(targets)
        self.score.update(preds, truths)
        for image, pred, truth in zip(self._inputs, preds, truths):
            if len(self.examples) < EXAMPLES:
                self.examples.append({"image": self._rgb(image), "pred": pred, "truth": truth})

    def _rgb(self, image: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.norm["mean"], np.float32)[:, None, None]
        std = np.asarray(self.norm["std"], np.float32)[:, None, None]
        return np.clip((image * std + mean) * 255.0, 0, 255).astype(np.uint8).transpose(1, 2, 0)

    def result(self) -> dict[str, Any]:
        r = self.score.result()
        return {**r, "samples": r.get("n", 0), "examples": self.examples}


def sliding_predictor(meta: dict[str, Any]):
    """predict(model, inputs): one pass for a batch of windows of the input size, else every image
    by sliding windows (logits averaged where windows overlap) -> a list of (C, H, W) arrays."""
    import torch

    from rsedge.runtime.tiling import sliding_window

    h, w = (int(v) for v in meta["input_size"])
    overlap = int(meta.get("overlap", 0) or 0)

    def predict(model, inputs):
        if torch.is_tensor(inputs) and tuple(inputs.shape[-2:]) == (h, w):
            return model(inputs)
        device = next(model.parameters()).device

        def run(windows: np.ndarray) -> np.ndarray:
            return model(torch.from_numpy(windows).to(device)).float().cpu().numpy()

        return [sliding_window(run, _numpy(image), h, w, overlap, batch=8) for image in inputs]

    return predict


def dice_loss(logits, targets, ignore_index: int = IGNORE_INDEX):
    """1 - mean soft Dice over classes, ignore-label pixels left out."""
    import torch.nn.functional as F

    valid = (targets != ignore_index).unsqueeze(1).float()
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(targets.clamp(0, logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2).float() * valid
    inter = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + 1) / (total + 1)).mean()


class SegmentationTask(Task):
    name = "segmentation"
    primary_metric = "miou"
    higher_is_better = True
    agreement_name = "pixel agreement"
    record_keys = ("miou", "global_accuracy", "mean_accuracy", "fwiou", "mean_bf", "per_class", "samples",
                   "pixels", "ignored", "skipped_images")

    @staticmethod
    def collate(batch):
        """Windows of one size stack into a tensor; whole images of any size stay lists."""
        from torch.utils.data import default_collate

        images = [b[0] for b in batch]
        if all(tuple(i.shape) == tuple(images[0].shape) for i in images):
            return default_collate(batch)
        return images, [b[1] for b in batch]

    # -- data ---------------------------------------------------------------------------------
    def eval_dataset(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]):
        from ..segdata import SegmentationImages

        return SegmentationImages(root, items, meta)

    def train_dataset(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]):
        from ..segdata import SegmentationPatches

        return SegmentationPatches(root, items, meta, augment=True, cache=_tile_cache(items))

    def datasets(self, split: dict[str, Any], meta: dict[str, Any], augment: bool = True):
        from ..segdata import SegmentationPatches

        train = (self.train_dataset(split["root"], split["train"], meta) if augment
                 else SegmentationPatches(split["root"], split["train"], meta, augment=False,
                                          cache=_tile_cache(split["train"])))
        return (train, self.eval_dataset(split["root"], split["val"], meta),
                self.eval_dataset(split["root"], split["test"], meta))

    def tensor_dataset(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]):
        """Up to CALIBRATION_WINDOWS windows of every image, evenly spread over it, not augmented."""
        import torch

        from ..segdata import SegmentationPatches

        patches = SegmentationPatches(root, items, meta, augment=False)
        by_image: dict[int, list[int]] = {}
        for index, window in enumerate(patches.windows):
            by_image.setdefault(int(window[0]), []).append(index)
        chosen = []
        for indices in by_image.values():
            picks = np.linspace(0, len(indices) - 1, min(CALIBRATION_WINDOWS, len(indices))).round().astype(int)
            chosen.extend(indices[i] for i in sorted(set(picks.tolist())))
        return torch.utils.data.Subset(patches, chosen)

    def new_split(self, root: Path, options: Any) -> dict[str, Any]:
        from ..segdata import SegLayout, make_segmentation_split

        return make_segmentation_split(root, SegLayout.from_dict(options.layout or {}), val=options.val,
                                       test=options.test, seed=options.seed, progress=options.progress)

    def check_split(self, split: dict[str, Any], root: Path) -> None:
        from ..segdata import check_segmentation_split

        check_segmentation_split(split)

    def scan_folder(self, meta: dict[str, Any], root: Path) -> list:
        from ..datasets import check_classes
        from ..segdata import SegLayout, scan_segmentation

        scan = scan_segmentation(root, SegLayout.from_dict(meta.get("data_layout") or {}))
        check_classes(meta["classes"], scan.classes, what=f"folder {root}")
        return [list(p) for p in scan.pairs]

    def split_meta(self, split: dict[str, Any], options: Any) -> dict[str, Any]:
        """Colours, ignore label, layout, and the window overlap (default a quarter of the side)."""
        size, overlap = options.img_size, options.overlap
        if overlap is not None and not 0 <= overlap < size:
            raise ValueError(f"--overlap must be in [0, {size}), not {overlap}")
        return {"colors": split.get("colors"), "ignore_index": int(split.get("ignore_index", IGNORE_INDEX)),
                "data_layout": split.get("layout") or {}, "overlap": size // 4 if overlap is None else int(overlap)}

    def check_input_size(self, size: Sequence[int]) -> None:
        from ..seg_models import check_input_size

        check_input_size(tuple(size))

    # -- training and scoring -----------------------------------------------------------------
    def loss(self, outputs, targets, inputs):
        import torch.nn.functional as F

        return F.cross_entropy(outputs, targets, ignore_index=IGNORE_INDEX)

    def training_loss(self, cfg: Any) -> LossFn:
        weight = float(getattr(cfg, "dice", 0.0) or 0.0)
        if not weight:
            return self.loss
        return lambda outputs, targets, inputs: self.loss(outputs, targets, inputs) + weight * dice_loss(
            outputs, targets)

    def evaluator(self, meta: dict[str, Any]) -> SegmentationEvaluator:
        return SegmentationEvaluator(meta)

    def training_evaluator(self, meta: dict[str, Any]) -> PixelEvaluator:
        return PixelEvaluator(meta["classes"], meta.get("ignore_index", IGNORE_INDEX))

    def predictor(self, meta: dict[str, Any]):
        return sliding_predictor(meta)

    def target_regions(self, feature_model, images, targets):
        """The objects of each image at F's size: its labelled pixels outside its most common class
        (the dominant land cover, as the boxes of a detector mark objects against the ground);
        all labelled pixels when an image holds one class only."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            _, feat = feature_model(images)
        masks = []
        for mask in targets:
            labelled = mask != IGNORE_INDEX
            values, counts = torch.unique(mask[labelled], return_counts=True)
            objects = labelled & (mask != values[counts.argmax()]) if len(values) > 1 else labelled
            masks.append(objects.float())
        stacked = torch.stack(masks)[:, None]
        return F.interpolate(stacked, size=feat.shape[-2:], mode="nearest")[:, 0].to(feat.device)

    def eval_batch_size(self, requested: int) -> int:
        return min(requested, 2)

    def summary(self, result: dict[str, Any]) -> str:
        lines = [f"mIoU {percent(result.get('miou'))}, global accuracy {percent(result.get('global_accuracy'))}, "
                 f"mean BF {percent(result.get('mean_bf'))} ({result.get('samples', 0)} images, sliding window)"]
        lines += per_class_lines(result.get("per_class") or {}, (("IoU", "iou"), ("accuracy", "accuracy")))
        return "\n".join(lines)

    def write_eval_outputs(self, out: Path, result: dict[str, Any], meta: dict[str, Any], title: str) -> None:
        from ..metrics import plot_confusion
        from ..records import atomic_write_json
        from .seg_plots import plot_overlays

        examples = result.get("examples") or []
        atomic_write_json(Path(out) / "metrics.json", {k: v for k, v in result.items() if k != "examples"})
        if result.get("confusion") is not None:
            plot_confusion(np.asarray(result["confusion"]), meta["classes"], Path(out) / "confusion.png", title)
        if examples:
            plot_overlays(examples, meta, Path(out) / "overlays.png", title)

    # -- export and the device ----------------------------------------------------------------
    def preprocess(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {**super().preprocess(meta), "colors": meta.get("colors"),
                "ignore_index": int(meta.get("ignore_index", IGNORE_INDEX)), "overlap": int(meta.get("overlap", 0))}

    def bundle_eval(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]
                    ) -> dict[str, Any]:
        """Whole images (uint8 RGB) and their masks, packed flat: the device normalizes them and
        slides the model's window over each, as `rsedge eval` does."""
        from rsedge.runtime.tasks.segmentation import pack_eval_set

        from ..segdata import read_pair

        images, masks = [], []
        for image_rel, mask_rel in items:
            image, mask = read_pair(Path(root), image_rel, mask_rel, meta)
            images.append(image)
            masks.append(mask)
        flat, targets = pack_eval_set(images, masks)
        return {"images": flat, "targets": targets, "count": len(images)}
