"""Semantic segmentation on the device: sliding windows over whole images, argmax, mIoU / BF score.

The model has a static input (the window, `rsedge.input_size`) and one output `logits`
(N, C, H, W) at the input's resolution. An evaluation image of any size is normalized with the
model's mean/std (RGB scaled to 0..1; never resized), cut into windows that overlap by
`rsedge.overlap` pixels (tiling.sliding_window: the last window of a row or column is moved back
flush with the edge, an image smaller than the window is padded and the padding cropped), the
windows' logits are averaged where they overlap and the argmax is scored against the mask on
the full image (segmetrics.SegScore), so a metric is always over whole images, as on the host.

A bundle's evaluation set holds tiles of different sizes, so it is stored flat (pack_eval_set):
eval/images.npy uint8 (sum of H*W*3,) each image's RGB pixels in HWC order one after the other,
eval/masks.npy uint8 (uint16 when a class id needs it) (sum of H*W,) class ids with the ignore
label where unlabelled, eval/shapes.npy int64 (N, 2) the (H, W) of each image; the manifest's
eval entry names them "images", "masks" and "shapes". They are read with mmap.
"""

import json
import os
import time

import numpy as np

from ..errors import RuntimeToolError
from ..fileio import atomic_write_text
from ..masks import write_index_mask
from ..preprocess import PreprocessSpec
from ..segmetrics import DEFAULT_IGNORE_INDEX, SegScore
from ..tiling import sliding_window
from .base import DeviceTask, eval_file, load_array

PREDICTIONS_JSON = "predictions.json"


def pack_eval_set(images, masks):
    """(images_flat, {"masks.npy": masks_flat, "shapes.npy": shapes}) of lists of (H, W, 3) uint8 RGB
    images and their (H, W) class-id masks: what the host's bundle writer saves under eval/."""
    if len(images) != len(masks):
        raise ValueError("{} images but {} masks".format(len(images), len(masks)))
    shapes = np.zeros((len(images), 2), dtype=np.int64)
    top = 0
    for i, (image, mask) in enumerate(zip(images, masks)):
        image, mask = np.asarray(image), np.asarray(mask)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError("image {}: expected (H, W, 3) uint8 RGB, got {} {}".format(i, image.shape, image.dtype))
        if mask.shape != image.shape[:2]:
            raise ValueError("image {}: mask shape {} differs from the image's {}".format(i, mask.shape,
                                                                                   image.shape[:2]))
        if mask.size and (not np.issubdtype(mask.dtype, np.integer) or int(mask.min()) < 0):
            raise ValueError("image {}: a mask holds non-negative integer class ids, got {}".format(i, mask.dtype))
        top = max(top, int(mask.max()) if mask.size else 0)
        shapes[i] = image.shape[:2]
    if top > 65535:
        raise ValueError("class id {} does not fit the uint16 mask format".format(top))
    mask_dtype = np.uint8 if top <= 255 else np.uint16
    images_flat = np.concatenate([np.asarray(im).reshape(-1) for im in images]) if len(images) else \
        np.zeros((0,), np.uint8)
    masks_flat = np.concatenate([np.asarray(m).reshape(-1).astype(mask_dtype) for m in masks]) if len(masks) else \
        np.zeros((0,), mask_dtype)
    return images_flat, {"masks.npy": masks_flat, "shapes.npy": shapes}


def unpack_eval_set(images_flat, masks_flat, shapes, limit=None):
    """(list of (H, W, 3) uint8 images, list of (H, W) masks): views into the flat arrays (mmap stays
    mmap), the first `limit` images only when given."""
    shapes = np.asarray(shapes).astype(np.int64).reshape(-1, 2)
    pixels = shapes[:, 0] * shapes[:, 1]
    if int(np.asarray(images_flat).size) != 3 * int(pixels.sum()) or int(np.asarray(masks_flat).size) != int(
            pixels.sum()):
        raise RuntimeToolError("the evaluation set is inconsistent: shapes.npy sums to {} pixels, images.npy holds "
                               "{} values (3 per pixel) and masks.npy {}".format(
                                   int(pixels.sum()), int(np.asarray(images_flat).size),
                                   int(np.asarray(masks_flat).size)))
    n = len(shapes) if not limit else min(len(shapes), int(limit))
    images, masks = [], []
    start = 0
    for (h, w), count in zip(shapes[:n], pixels[:n]):
        images.append(images_flat[3 * start:3 * (start + count)].reshape(int(h), int(w), 3))
        masks.append(masks_flat[start:start + count].reshape(int(h), int(w)))
        start += int(count)
    return images, masks


def window_plan(meta, input_shape=None, log=None):
    """(PreprocessSpec, (window h, window w), overlap) of a segmentation model from its metadata and
    its input shape (a static one stands in for a missing rsedge.input_size)."""
    spec = PreprocessSpec.from_metadata(meta, input_shape, log=log)
    if spec.layout != "NCHW":
        raise RuntimeToolError("segmentation models are evaluated with an NCHW input, this one is {}".format(
            spec.layout))
    th, tw = spec.input_size
    dims = list(input_shape or [])[2:4]
    if len(dims) == 2 and all(isinstance(d, int) and d > 0 for d in dims) and tuple(dims) != (th, tw):
        raise RuntimeToolError("the model's input is {}x{} but its rsedge.input_size says {}x{}: re-export "
                               "it".format(dims[0], dims[1], th, tw))
    overlap = int(meta.get("overlap") or 0)
    if not 0 <= overlap < min(th, tw):
        raise RuntimeToolError("rsedge.overlap {} must be in [0, {}) for {}x{} windows".format(
            overlap, min(th, tw), th, tw))
    return spec, (th, tw), overlap


def normalize_image(image, spec):
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 normalized as the model's metadata says, not resized."""
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    if spec.color == "BGR":
        x = x[:, :, ::-1]
    x = (x - spec.mean) / spec.std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def _palette(colors, n):
    """768 palette bytes: the model's colours, else a fixed spread of colours, index = class id."""
    out = []
    for k in range(256):
        if colors and k < len(colors) and colors[k] is not None and len(colors[k]) == 3:
            out.extend(int(c) for c in colors[k])
        elif k < n:
            out.extend(((k * 97 + 40) % 256, (k * 57 + 120) % 256, (k * 151 + 200) % 256))
        else:
            out.extend((0, 0, 0))
    return out


class PredictionWriter(object):
    """Writes each evaluated image's predicted mask to a folder: NNNN.png (an index PNG, pixel value =
    class id, the model's colours as palette) where Pillow is importable and the ids fit a byte,
    else NNNN.npy; finish() writes predictions.json listing them."""

    def __init__(self, directory, meta, log=None):
        self.directory = directory
        self.meta = meta
        self.files = []
        self.Image = _pillow()
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise RuntimeToolError("cannot create {}: {}".format(directory, e)) from e
        if self.Image is None and log:
            log("note: Pillow is not importable: predicted masks are written as .npy")

    def add(self, index, mask):
        name = "{:04d}".format(index)
        h, w = mask.shape
        name += ".png" if self.Image is not None and mask.dtype == np.uint8 else ".npy"
        write_index_mask(os.path.join(self.directory, name), mask,
                         _palette(self.meta.get("colors"), len(self.meta.get("classes") or ())))
        self.files.append({"index": int(index), "file": name, "height": int(h), "width": int(w)})

    def finish(self):
        doc = {"format": "rsedge-predictions/1", "task": "segmentation",
               "encoding": "pixel value = class id (index PNG, or .npy)", "classes": self.meta.get("classes"),
               "colors": self.meta.get("colors"), "ignore_index": _ignore_index(self.meta), "files": self.files}
        path = os.path.join(self.directory, PREDICTIONS_JSON)
        atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
        return {"dir": self.directory, "index": path, "count": len(self.files)}


def _ignore_index(meta):
    value = meta.get("ignore_index")
    return DEFAULT_IGNORE_INDEX if value is None else int(value)


def _check_logits(logits, window, classes):
    if logits.ndim != 4 or tuple(logits.shape[2:]) != tuple(window):
        raise RuntimeToolError("a segmentation model must output logits (N, C, {}, {}) at its input size, this one "
                               "gives {}".format(window[0], window[1], tuple(logits.shape)))
    if classes is not None and logits.shape[1] != len(classes):
        raise RuntimeToolError("the model outputs {} classes but its metadata names {}".format(logits.shape[1],
                                                                                            len(classes)))


class SegmentationTask(DeviceTask):
    name = "segmentation"
    outputs = ("logits",)
    targets_name = "masks"
    sample_unit = "windows"

    def decode(self, outputs, metadata):
        """logits (N, C, H, W) -> class ids (N, H, W), uint8 when C <= 255."""
        logits = np.asarray(self.output(outputs, "logits"))
        if logits.ndim != 4:
            raise RuntimeToolError("segmentation logits must be (N, C, H, W), got shape {}".format(logits.shape))
        return logits.argmax(axis=1).astype(np.uint8 if logits.shape[1] <= 255 else np.uint16)

    def accumulator(self, metadata):
        classes = metadata.get("classes")
        if not classes:
            raise RuntimeToolError("the segmentation model carries no rsedge.classes: cannot score its masks")
        return SegScore(classes, ignore_index=_ignore_index(metadata))

    def agreement(self, reference, candidate, metadata):
        """Fraction of pixels with the same predicted class."""
        a, b = self.decode(reference, metadata), self.decode(candidate, metadata)
        return float(np.mean(a == b)) if a.size else 1.0

    def load_eval(self, bundle_dir, entry, limit=None):
        return unpack_eval_set(load_array(eval_file(bundle_dir, entry, "images")),
                               load_array(eval_file(bundle_dir, entry, "masks")),
                               load_array(eval_file(bundle_dir, entry, "shapes")), limit)

    def load_targets(self, bundle_dir, entry, limit=None):
        return self.load_eval(bundle_dir, entry, limit)[1]

    def evaluate(self, loop, images, targets, options):
        """Every whole image through the model by sliding windows; mIoU, accuracies and BF on full images.

        observe(start, outputs) sees every chunk of windows, in order (image by image, windows in
        grid order), start counting windows: rsedge-bench compares variants on the same windows."""
        meta = loop.metadata
        if len(images) != len(targets):
            raise RuntimeToolError("{} images but {} masks".format(len(images), len(targets)))
        spec, window, overlap = window_plan(meta, loop.input.shape, options.log)
        score = self.accumulator(meta)
        writer = PredictionWriter(options.save_predictions, meta, options.log) if options.save_predictions else None
        done = [0]

        def predict(windows):
            outputs = loop.infer(windows)
            _check_logits(np.asarray(self.output(outputs, "logits")), window, meta.get("classes"))
            if options.observe is not None:
                options.observe(done[0], outputs)
            done[0] += len(windows)
            return self.output(outputs, "logits")

        options.log("evaluating {} images ({})".format(len(images), self.describe(meta)))
        t0 = time.time()
        for i, (image, mask) in enumerate(zip(images, targets)):
            if tuple(np.shape(mask)) != tuple(np.shape(image)[:2]):
                raise RuntimeToolError("image {}: mask {} does not match the image {}".format(
                    i, np.shape(mask), np.shape(image)))
            logits = sliding_window(predict, normalize_image(image, spec), window[0], window[1], overlap,
                                    batch=loop.size)
            pred = logits.argmax(axis=0).astype(np.uint8 if logits.shape[0] <= 255 else np.uint16)
            score.add(pred, np.asarray(mask))
            if writer is not None:
                writer.add(i, pred)
            if (i + 1) % 10 == 0 or i + 1 == len(images):
                options.log("  evaluated {}/{} images ({} windows)".format(i + 1, len(images), done[0]))
        seconds = time.time() - t0
        result = dict(score.result(), task=self.name, windows=done[0], window=list(window), overlap=overlap,
                      seconds=seconds)
        if writer is not None:
            result["predictions"] = writer.finish()
        return result

    def summary(self, result):
        if result.get("miou") is None:
            return None
        bf = result.get("mean_bf")
        return "mIoU {:.2f} %, global accuracy {:.2f} %, mean BF {} on {} images".format(
            100.0 * result["miou"], 100.0 * result["global_accuracy"],
            "n/a" if bf is None else "{:.2f} %".format(100.0 * bf), result["n"])

    def describe(self, metadata):
        size = metadata.get("input_size") or ("?", "?")
        return "{} classes, {}x{} windows, overlap {}".format(len(metadata.get("classes") or ()), size[0], size[1],
                                                             int(metadata.get("overlap") or 0))
