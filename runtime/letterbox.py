"""Letterbox: resize an image to fit the model's input keeping its aspect ratio, and pad the rest.

Detectors see objects at their true proportions this way (a plain resize would squash a 1000x600
aerial scene and every box in it). The host's training and evaluation data and the device both
call `letterbox` here, so the pixels a deployed detector sees are the pixels it was scored on.

The image is scaled by s = min(H / h, W / w), resized bilinearly (runtime.resize.resize_bilinear:
Pillow when present) to (round(h*s), round(w*s)) and placed at (pad_x, pad_y) = half the leftover
space, rounded down, on a canvas filled with `pad_value` (114, mid grey, as is usual for YOLO-style
detectors). A box maps by x' = x * s + pad_x (boxes_to_input) and back by the inverse, clipped to
the original image (boxes_to_image). Pure numpy; Python 3.6.
"""

import numpy as np

from .resize import resize_bilinear

PAD_VALUE = 114


class LetterboxInfo(object):
    """Where an image went in the letterboxed input: its original size, the scale and the padding."""

    __slots__ = ("height", "width", "scale", "pad_x", "pad_y")

    def __init__(self, height, width, scale, pad_x, pad_y):
        self.height, self.width = int(height), int(width)
        self.scale, self.pad_x, self.pad_y = float(scale), int(pad_x), int(pad_y)

    def as_row(self):
        """[height, width, scale, pad_x, pad_y]: how a bundle stores it (one float64 row per image)."""
        return [float(self.height), float(self.width), self.scale, float(self.pad_x), float(self.pad_y)]

    @classmethod
    def from_row(cls, row):
        return cls(int(round(row[0])), int(round(row[1])), float(row[2]), int(round(row[3])), int(round(row[4])))

    def __repr__(self):
        return "LetterboxInfo(height={}, width={}, scale={:.6g}, pad_x={}, pad_y={})".format(
            self.height, self.width, self.scale, self.pad_x, self.pad_y)


def letterbox_geometry(height, width, size):
    """(resized height, resized width, LetterboxInfo) of an image of height x width in an input of `size` (h, w)."""
    out_h, out_w = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError("cannot letterbox an empty image ({}x{})".format(height, width))
    scale = min(out_h / float(height), out_w / float(width))
    new_h = min(out_h, max(1, int(round(height * scale))))
    new_w = min(out_w, max(1, int(round(width * scale))))
    info = LetterboxInfo(height, width, scale, (out_w - new_w) // 2, (out_h - new_h) // 2)
    return new_h, new_w, info


def letterbox(image, size, pad_value=PAD_VALUE):
    """(uint8 HxWx3 array of `size`, LetterboxInfo) for an RGB uint8 image of any size."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError("letterbox needs an H x W x C image, got shape {}".format(image.shape))
    new_h, new_w, info = letterbox_geometry(image.shape[0], image.shape[1], size)
    resized = image if (new_h, new_w) == image.shape[:2] else resize_bilinear(image, (new_h, new_w))
    canvas = np.full((int(size[0]), int(size[1]), image.shape[2]), pad_value, dtype=np.uint8)
    canvas[info.pad_y:info.pad_y + new_h, info.pad_x:info.pad_x + new_w] = resized
    return canvas, info


def boxes_to_input(boxes, info):
    """Boxes (K, 4) xyxy in original pixels -> the letterboxed input's pixels."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    offset = np.array([info.pad_x, info.pad_y, info.pad_x, info.pad_y], np.float64)
    return boxes * info.scale + offset


def boxes_to_image(boxes, info):
    """Boxes (K, 4) xyxy in the letterboxed input's pixels -> original pixels, clipped to the image."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    offset = np.array([info.pad_x, info.pad_y, info.pad_x, info.pad_y], np.float64)
    out = (boxes - offset) / info.scale
    out[:, 0::2] = np.clip(out[:, 0::2], 0.0, float(info.width))
    out[:, 1::2] = np.clip(out[:, 1::2], 0.0, float(info.height))
    return out
