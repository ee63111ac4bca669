"""Detection datasets on the host: letterboxed images and their boxes, with joint box augmentation.

A sample is `(image, target)`: image float32 (3, H, W), the letterboxed RGB scaled to 0..1 and
normalized by meta["normalization"] (detectors: mean 0, std 1); target float32 (K, 5)
[cls, x1, y1, x2, y2] in input pixels (the letterboxed canvas of meta["input_size"]). Batch with
`detection_collate` (the box count differs per image).

Letterbox first. Every image goes through runtime.letterbox (the device's own code) to the input
size; augmentation then works on that fixed canvas, so shapes never change and the evaluation
pixels (augment=False) are exactly what the device computes. Training augmentation uses
torchvision.transforms.v2's kernels on tv_tensors.BoundingBoxes (XYXY): colour (brightness,
saturation, hue: the usual HSV gains), horizontal and vertical flips (aerial images have no up),
an affine scale + translate (rotation optional, off by default) filled with the pad grey, then
boxes are clipped to the canvas and dropped when narrower or lower than `min_size` pixels or when
less than `min_visible` of their area stays on the canvas (labels stay aligned). Optional mosaic:
the image and three others, each letterboxed to half size, fill the four quadrants.

Randomness. Every random choice of a sample comes from numpy.random.default_rng([seed, epoch,
index]): the same (seed, epoch, index) gives the same sample in any process and any worker, and
no global RNG (torch, numpy, random) is read or advanced. The trainer calls `set_epoch(epoch)`
before each epoch (like DistributedSampler), else every epoch repeats the same augmentation; with
DataLoader workers the dataset reaches the workers when an epoch's iterator starts, so this needs
persistent_workers=False.

Unreadable images. An image that cannot be decoded raises trainer.datasets.UnreadableImage, which
`SkipUnreadable` turns into an `Unreadable` marker and `collate_readable` drops and counts. A
mosaic partner that cannot be read leaves its quadrant grey and empty (the image itself is
reported when its own index comes up).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from rsedge.runtime.letterbox import PAD_VALUE, LetterboxInfo, boxes_to_input, letterbox, letterbox_geometry
from rsedge.runtime.masks import image_size
from rsedge.runtime.preprocess import load_image

from .datasets import DatasetError, UnreadableImage

DETECTION_MEAN = (0.0, 0.0, 0.0)
DETECTION_STD = (1.0, 1.0, 1.0)


@dataclass
class AugmentOptions:
    """Training augmentation. Probabilities for the flips; `scale` the affine zoom range;
    `translate` the largest shift as a fraction of the canvas; `degrees` the largest rotation
    (0: none); `brightness`/`saturation` factors drawn in 1 +- value, `hue` a shift in +-value
    (fraction of the hue circle); boxes under `min_size` px wide or high, or with less than
    `min_visible` of their area left on the canvas, are dropped."""

    flip_lr: float = 0.5
    flip_ud: float = 0.5
    scale: tuple[float, float] = (0.5, 1.5)
    translate: float = 0.1
    degrees: float = 0.0
    brightness: float = 0.4
    saturation: float = 0.7
    hue: float = 0.015
    min_size: float = 2.0
    min_visible: float = 0.25


def _item_arrays(item: Sequence[Any]) -> tuple[str, np.ndarray, np.ndarray]:
    """(rel, boxes (K, 4) float64, classes (K,) int64) of a split item [rel, [[x1, y1, x2, y2, cls], ...]]."""
    if len(item) != 2:
        raise DatasetError(f"a detection split item is [image, boxes], got {item!r:.80}")
    rel, rows = item
    rows = np.asarray(rows, np.float64).reshape(-1, 5)
    return str(rel), rows[:, :4].copy(), rows[:, 4].astype(np.int64)


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _flip_and_affine(image: torch.Tensor, boxes: torch.Tensor, opts: AugmentOptions,
                     rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flips and the affine on (uint8 image, boxes) -> (image, boxes clipped to the canvas, the
    fraction of each box's area left on the canvas)."""
    h, w = image.shape[-2:]
    # The affine is also applied to a copy of the boxes on a canvas 5x as large, centred at the
    # same point, so nothing is clipped there: its areas are the unclipped areas.
    big = tv_tensors.BoundingBoxes(boxes + torch.tensor([2 * w, 2 * h] * 2, dtype=boxes.dtype), format="XYXY",
                                   canvas_size=(5 * h, 5 * w))
    if rng.random() < opts.flip_lr:
        image, big = F.horizontal_flip(image), F.horizontal_flip(big)
    if rng.random() < opts.flip_ud:
        image, big = F.vertical_flip(image), F.vertical_flip(big)
    scale = float(rng.uniform(*opts.scale))
    shift = [float(round(rng.uniform(-opts.translate, opts.translate) * n)) for n in (w, h)]
    angle = float(rng.uniform(-opts.degrees, opts.degrees)) if opts.degrees else 0.0
    if scale != 1.0 or angle or any(shift):
        image = F.affine(image, angle=angle, translate=shift, scale=scale, shear=[0.0, 0.0],
                         interpolation=F.InterpolationMode.BILINEAR, fill=[float(PAD_VALUE)] * 3)
        big = F.affine(big, angle=angle, translate=shift, scale=scale, shear=[0.0, 0.0])
    free = big.as_subclass(torch.Tensor) - torch.tensor([2 * w, 2 * h] * 2, dtype=boxes.dtype)
    clipped = torch.stack([free[:, 0].clamp(0, w), free[:, 1].clamp(0, h), free[:, 2].clamp(0, w),
                           free[:, 3].clamp(0, h)], 1)
    area = ((free[:, 2] - free[:, 0]) * (free[:, 3] - free[:, 1])).clamp(min=1e-9)
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]) / area
    return image, clipped, visible


def augment_sample(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, opts: AugmentOptions,
                   rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Colour, flips, affine and the box filter on a letterboxed sample: uint8 (3, H, W), boxes
    (K, 4) float32 xyxy input pixels, labels (K,) -> the same, shapes of the image unchanged."""
    gains = (rng.uniform(1 - opts.brightness, 1 + opts.brightness),
             rng.uniform(1 - opts.saturation, 1 + opts.saturation), rng.uniform(-opts.hue, opts.hue))
    if opts.brightness:
        image = F.adjust_brightness(image, float(gains[0]))
    if opts.saturation:
        image = F.adjust_saturation(image, float(gains[1]))
    if opts.hue:
        image = F.adjust_hue(image, float(gains[2]))
    image, boxes, visible = _flip_and_affine(image, boxes, opts, rng)
    size = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    keep = (size >= max(opts.min_size, 1e-6)) & (visible >= opts.min_visible)
    return image, boxes[keep], labels[keep]


def detection_collate(batch: Sequence[Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(images (N, 3, H, W), [target (K_i, 5) per image]): the contract's detection batch."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


class DetectionImages:
    """Letterboxed detection samples over split items `[rel, [[x1, y1, x2, y2, cls], ...]]` (boxes
    in original pixels); see the module docstring. `cache` keeps the last decoded originals per
    process (an LRU; 0: none), for when decoding dominates."""

    def __init__(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any],
                 augment: bool = False, mosaic: float = 0.0, seed: int = 0,
                 options: AugmentOptions | None = None, cache: int = 0):
        self.root = Path(root)
        self.items = [_item_arrays(it) for it in items]
        self.size = (int(meta["input_size"][0]), int(meta["input_size"][1]))
        norm = meta.get("normalization") or {}
        self.mean = torch.tensor([float(v) for v in norm.get("mean", DETECTION_MEAN)]).view(3, 1, 1)
        self.std = torch.tensor([float(v) for v in norm.get("std", DETECTION_STD)]).view(3, 1, 1)
        if not 0.0 <= float(mosaic) <= 1.0:
            raise ValueError(f"mosaic is a probability in 0..1, got {mosaic}")
        self.augment, self.mosaic, self.seed = bool(augment), float(mosaic), int(seed)
        self.options = options or AugmentOptions()
        self.epoch = 0
        self.cache_size = int(cache)
        self._cache: OrderedDict = OrderedDict()
        self._sizes: dict[int, tuple[int, int]] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next samples belong to: part of every sample's seed."""
        self.epoch = int(epoch)

    def path(self, index: int) -> Path:
        return self.root / self.items[index][0]

    def image_hw(self, index: int) -> tuple[int, int]:
        """(height, width) of item `index` from its file header (no decoding); UnreadableImage if unreadable."""
        if index not in self._sizes:
            try:
                self._sizes[index] = tuple(int(v) for v in image_size(str(self.path(index))))
            except Exception as e:  # noqa: BLE001 - any header failure means the file is unusable
                raise UnreadableImage(str(self.path(index)), f"{type(e).__name__}: {e}") from e
        return self._sizes[index]

    def info(self, index: int) -> LetterboxInfo:
        """Where item `index` lies in the (unaugmented) input: maps its predictions back to its pixels."""
        return letterbox_geometry(*self.image_hw(index), self.size)[2]

    def boxes_wh(self) -> np.ndarray:
        """(M, 2) float32 widths and heights of every box in input pixels after letterbox (what
        anchor fitting reads), from the labels and the file headers; items whose header cannot
        be read are left out."""
        out = []
        for i, (_, boxes, _) in enumerate(self.items):
            if len(boxes) == 0:
                continue
            try:
                scale = self.info(i).scale
            except UnreadableImage:
                continue
            out.append((boxes[:, 2:4] - boxes[:, 0:2]) * scale)
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 2), np.float32)

    def load(self, index: int) -> np.ndarray:
        """The decoded original of item `index`, HxWx3 uint8 RGB (through the LRU cache)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        try:
            image = load_image(str(self.path(index)))
        except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
            raise UnreadableImage(str(self.path(index)), f"{type(e).__name__}: {e}") from e
        if self.cache_size > 0:
            self._cache[index] = image
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return image

    def letterboxed(self, index: int, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uint8 HxWx3 canvas of `size`, boxes (K, 4) in its pixels, classes (K,)) of item `index`."""
        canvas, info = letterbox(self.load(index), size)
        _, boxes, classes = self.items[index]
        return canvas, boxes_to_input(boxes, info), classes

    def _mosaic(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Item `index` and three others (distinct when the set has them) letterboxed to half size
        into the four quadrants, in a random arrangement."""
        h, w = self.size
        others = [i for i in range(len(self)) if i != index] or [index]
        picked = [index] + [int(i) for i in rng.choice(others, size=3, replace=len(others) < 3)]
        places = rng.permutation(4)
        canvas = np.full((h, w, 3), PAD_VALUE, np.uint8)
        boxes, classes = [np.zeros((0, 4))], [np.zeros(0, np.int64)]
        for i, place in zip(picked, places):
            y0, x0 = (h // 2) * (place // 2), (w // 2) * (place % 2)
            qh, qw = (h - h // 2 if place // 2 else h // 2), (w - w // 2 if place % 2 else w // 2)
            try:
                quad, b, c = self.letterboxed(i, (qh, qw))
            except UnreadableImage:
                if i == index:
                    raise
                continue
            canvas[y0:y0 + qh, x0:x0 + qw] = quad
            boxes.append(b + np.array([x0, y0, x0, y0], np.float64))
            classes.append(c)
        return canvas, np.concatenate(boxes), np.concatenate(classes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        if not self.augment:
            canvas, boxes, classes = self.letterboxed(index, self.size)
            image, boxes, labels = _chw(canvas), torch.from_numpy(boxes).float(), torch.from_numpy(classes)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            use_mosaic = rng.random() < self.mosaic
            canvas, boxes, classes = (self._mosaic(index, rng) if use_mosaic else
                                      self.letterboxed(index, self.size))
            image, boxes, labels = augment_sample(_chw(canvas), torch.from_numpy(boxes).float(),
                                                  torch.from_numpy(classes), self.options, rng)
        image = (image.float() / 255.0 - self.mean) / self.std
        target = torch.cat([labels.float().view(-1, 1), boxes.float().view(-1, 4)], 1)
        return image.contiguous(), target
