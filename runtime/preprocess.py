"""Preprocessing from the model's own metadata, so a device can classify a folder of images.

The host exporter writes the recipe into the model (ONNX `metadata_props`, `rsedge.*` keys,
JSON strings for lists) and the bundle repeats it in `preprocess.json` (same keys without the
prefix, native JSON values); an engine carries it in its sidecar. One rule finds it:

1. a `.onnx` file's own `metadata_props`;
2. keys it lacks come from `preprocess.json` next to the model;
3. an engine's sidecar `metadata` (copied from 1+2 when the engine was built).

Pixels are RGB, scaled to 0..1, resized (bilinear) to `input_size`, normalized with mean/std
and laid out as NCHW float32. Detectors say `resize: "letterbox"` instead: the image keeps its
aspect ratio and the rest of the input is filled with `pad_value` (runtime/letterbox.py, the
same function the host trains and evaluates with); `PreprocessSpec.prepare` returns the
LetterboxInfo with the pixels, so boxes can be mapped back to the original image.
With Pillow present every image (arrays included) is resized by Pillow, which is what
torchvision's Resize does on PIL images; without Pillow a numpy bilinear resize (half-pixel
centres, no antialiasing) is used, and only .npy / .ppm / .pgm can be read.
"""

import json
import os

import numpy as np

from .errors import RuntimeToolError
from .imagefolder import IMAGE_EXTENSIONS, list_labeled_folder  # noqa: F401 - also read from here
from .letterbox import PAD_VALUE, letterbox, letterbox_geometry
from .resize import _pil, resize_bilinear, resize_bilinear_numpy  # noqa: F401 - also read from here

PREFIX = "rsedge."
KEYS = ("task", "classes", "input_size", "mean", "std", "layout", "color", "resize", "version", "precision", "arch",
        "colors", "ignore_index", "overlap", "pad_value", "conf_threshold", "iou_threshold", "eval_conf_threshold",
        "eval_iou_threshold", "max_det")
JSON_KEYS = ("classes", "input_size", "mean", "std", "colors")
# segmentation: the ignore label and the sliding-window overlap (pixels); detection: the letterbox's
# fill value and the most detections an image keeps
INT_KEYS = ("ignore_index", "overlap", "pad_value", "max_det")
# detection: score and NMS IoU thresholds, for deployment and for evaluation (mAP), all in [0, 1]
FLOAT_KEYS = ("conf_threshold", "iou_threshold", "eval_conf_threshold", "eval_iou_threshold")
RESIZE_MODES = ("resize", "letterbox")
PREPROCESS_JSON = "preprocess.json"


def _decode(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _int(name, value):
    value = _decode(value)
    if value is None:
        return None
    try:
        if isinstance(value, bool) or float(value) != int(value):
            raise ValueError(value)
        return int(value)
    except (TypeError, ValueError):
        raise RuntimeToolError("metadata {}{} must be an integer, got {!r}".format(PREFIX, name, value)) from None


def _fraction(name, value):
    value = _decode(value)
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not 0.0 <= number <= 1.0:
        raise RuntimeToolError("metadata {}{} must be a number in [0, 1], got {!r}".format(PREFIX, name, value))
    return number


def normalize_metadata(raw):
    """{'rsedge.mean': '[0.4, ...]'} or {'mean': [0.4, ...]} -> {'mean': [0.4, ...]}; other keys dropped.

    Lists (classes, input_size, mean, std, colors) are JSON-decoded, integers (ignore_index,
    overlap, pad_value, max_det) and thresholds (floats in [0, 1]) parsed; a segmentation model's
    colors may be null."""
    out = {}
    for key, value in (raw or {}).items():
        name = key.split(PREFIX, 1)[1] if key.startswith(PREFIX) else key
        if name in INT_KEYS:
            out[name] = _int(name, value)
        elif name in FLOAT_KEYS:
            out[name] = _fraction(name, value)
        elif name in KEYS:
            out[name] = _decode(value) if name in JSON_KEYS else value
    return out


def to_metadata_props(meta):
    """The inverse: metadata_props strings, as the host exporter writes them."""
    props = {}
    for key, value in meta.items():
        props[PREFIX + key] = value if isinstance(value, str) else json.dumps(value)
    return props


def read_preprocess_json(directory):
    path = os.path.join(directory, PREPROCESS_JSON)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, "r") as f:
            return normalize_metadata(json.load(f))
    except ValueError as e:
        raise RuntimeToolError(f"{path} is not valid JSON: {e}") from e


def merge_metadata(own, fallback):
    """Keys of the model's own metadata win; the fallback fills the gaps."""
    merged = dict(fallback)
    merged.update(own)
    return merged


def onnx_metadata(onnx_path):
    """Rule 1+2 for an ONNX file, read without the onnx package."""
    from .build.onnx_meta import read_onnx_info

    own = normalize_metadata(read_onnx_info(onnx_path)["metadata"])
    return merge_metadata(own, read_preprocess_json(os.path.dirname(os.path.abspath(onnx_path))))


class PreprocessSpec:
    """What to do to an image before the model sees it.

    resize: "resize" (the whole image, bilinear, to input_size) or "letterbox" (aspect kept, padded
    with pad_value; detectors). `spec(image)` gives the model's input; `spec.prepare(image)` gives
    (input, LetterboxInfo or None) and `spec.letterbox_info(image)` the info alone (None for
    "resize", whose scale is not one number)."""

    def __init__(self, input_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), layout="NCHW", color="RGB",
                 resize="resize", pad_value=PAD_VALUE):
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3)
        self.std = np.asarray(std, dtype=np.float32).reshape(3)
        if np.any(self.std == 0):
            raise RuntimeToolError(f"std contains 0: {list(std)}")
        self.layout = layout.upper()
        self.color = color.upper()
        self.resize = resize
        self.pad_value = PAD_VALUE if pad_value is None else int(pad_value)
        if self.layout not in ("NCHW", "NHWC"):
            raise RuntimeToolError(f"unsupported layout {layout!r} (NCHW or NHWC)")
        if self.color not in ("RGB", "BGR"):
            raise RuntimeToolError(f"unsupported color order {color!r} (RGB or BGR)")
        if self.resize not in RESIZE_MODES:
            raise RuntimeToolError(f"unsupported resize mode {resize!r} ('resize': whole image, bilinear; "
                                   "'letterbox': aspect kept, padded)")
        if not 0 <= self.pad_value <= 255:
            raise RuntimeToolError(f"pad_value {self.pad_value} is not a pixel value (0..255)")

    @classmethod
    def from_metadata(cls, meta, input_shape=None, log=None):
        """From normalized metadata; a static model input shape stands in for a missing input_size."""
        size = meta.get("input_size")
        if size is None and input_shape is not None:
            dims = list(input_shape)
            layout = str(meta.get("layout", "NCHW")).upper()
            hw = dims[2:4] if layout == "NCHW" else dims[1:3]
            if len(hw) == 2 and all(isinstance(d, int) and d > 0 for d in hw):
                size = hw
        if size is None:
            raise RuntimeToolError("the model carries no rsedge.input_size metadata and its input shape is "
                                   "dynamic: cannot tell how to resize images (re-export it with rsedge, or put a "
                                   "preprocess.json next to it)")
        if ("mean" not in meta or "std" not in meta) and log:
            log("warning: the model carries no rsedge.mean/rsedge.std: images are only scaled to 0..1")
        return cls(size, meta.get("mean", (0.0, 0.0, 0.0)), meta.get("std", (1.0, 1.0, 1.0)),
                   meta.get("layout", "NCHW"), meta.get("color", "RGB"), meta.get("resize", "resize"),
                   meta.get("pad_value"))

    def to_dict(self):
        out = {"input_size": list(self.input_size), "mean": [float(x) for x in self.mean],
               "std": [float(x) for x in self.std], "layout": self.layout, "color": self.color,
               "resize": self.resize}
        if self.resize == "letterbox":
            out["pad_value"] = self.pad_value
        return out

    def letterbox_info(self, image):
        """The LetterboxInfo of an image (an array, or its shape) under this spec; None for "resize"."""
        if self.resize != "letterbox":
            return None
        shape = image if isinstance(image, (tuple, list)) else np.shape(image)
        return letterbox_geometry(int(shape[0]), int(shape[1]), self.input_size)[2]

    def prepare(self, image):
        """(model input, LetterboxInfo or None) of an HxWx3 uint8 RGB image."""
        if self.resize == "letterbox":
            resized, info = letterbox(image, self.input_size, self.pad_value)
        else:
            resized, info = resize_bilinear(image, self.input_size), None
        return self.normalize(resized), info

    def normalize(self, resized):
        """HxWx3 uint8 RGB at the input size -> float32 CHW (or HWC); mean/std are in the model's channel order."""
        x = resized.astype(np.float32) / np.float32(255.0)
        if self.color == "BGR":
            x = x[:, :, ::-1]
        x = (x - self.mean) / self.std
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def __call__(self, image):
        """HxWx3 uint8 RGB -> float32 CHW (or HWC) ready for the model."""
        return self.prepare(image)[0]


def _read_pnm(path):
    """Binary PPM (P6) / PGM (P5), 8-bit: the formats a numpy-only device can still read."""
    with open(path, "rb") as f:
        data = f.read()
    tokens = []
    pos = 0
    while len(tokens) < 4:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            while pos < len(data) and data[pos:pos + 1] not in (b"\n", b"\r"):
                pos += 1
            continue
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace():
            pos += 1
        if start == pos:
            raise ValueError("truncated PNM header")
        tokens.append(data[start:pos])
    pos += 1
    magic, width, height, maxval = tokens[0], int(tokens[1]), int(tokens[2]), int(tokens[3])
    if magic not in (b"P5", b"P6") or maxval > 255:
        raise ValueError("only 8-bit binary PPM (P6) and PGM (P5) are supported")
    channels = 3 if magic == b"P6" else 1
    pixels = np.frombuffer(data, dtype=np.uint8, count=width * height * channels, offset=pos)
    return pixels.reshape(height, width, channels)


def _to_rgb_uint8(arr, path):
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected an HxWxC or CxHxW image, got shape {arr.shape}")
    if arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 pixels, got {arr.dtype}")
    return np.ascontiguousarray(arr)


def load_image(path):
    """Any supported image file -> HxWx3 uint8 RGB. Raises ValueError/IOError if unreadable."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return _to_rgb_uint8(np.load(path, allow_pickle=False), path)
    Image = _pil()
    if Image is not None:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    if ext in (".ppm", ".pgm"):
        return _to_rgb_uint8(_read_pnm(path), path)
    raise RuntimeToolError(f"reading {ext} files needs Pillow (pip install pillow); without it only .npy, .ppm and "
                           ".pgm images can be read")
