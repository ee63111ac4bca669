"""Bilinear resizing of uint8 RGB images: Pillow when present, numpy otherwise (the device may
have no Pillow); what preprocessing and the letterbox both resize with."""

import numpy as np


def _pil():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def resize_bilinear(image, size):
    """Resize HxWx3 uint8 to size=(H, W): Pillow's bilinear when present, numpy's otherwise."""
    h, w = size
    if image.shape[0] == h and image.shape[1] == w:
        return image
    Image = _pil()
    if Image is not None:
        resample = getattr(Image, "Resampling", Image).BILINEAR
        return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), resample))
    return resize_bilinear_numpy(image, size)


def resize_bilinear_numpy(image, size):
    """Bilinear resize with half-pixel centres (align_corners=False), no antialiasing."""
    h, w = size
    src = image.astype(np.float32)
    in_h, in_w = src.shape[:2]

    def axis(out_len, in_len):
        pos = (np.arange(out_len, dtype=np.float32) + 0.5) * (float(in_len) / out_len) - 0.5
        pos = np.clip(pos, 0, in_len - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, in_len - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, wy = axis(h, in_h)
    x0, x1, wx = axis(w, in_w)
    top = src[y0][:, x0] * (1 - wx)[None, :, None] + src[y0][:, x1] * wx[None, :, None]
    bottom = src[y1][:, x0] * (1 - wx)[None, :, None] + src[y1][:, x1] * wx[None, :, None]
    out = top * (1 - wy)[:, None, None] + bottom * wy[:, None, None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
