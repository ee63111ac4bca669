"""Fixed-size windows over a large image, and the stitching of their predictions back into one.

A segmentation model is exported with a static input (H x W, multiples of 32), while aerial tiles
come in any size (the Dubai set: 509x544 to 2149x2062). Training cuts tiles into patches with
`window_grid`; evaluation runs the model on every window of a whole tile and averages the logits
where windows overlap (`Stitcher`), so a metric is always over full images, on the host (numpy
or torch arrays) and on the device (numpy) alike.

Rules: windows step by `tile - overlap` and the last window of a row or column is moved back to
end flush with the image, so every pixel is covered and no window hangs over the edge. An image
smaller than the window is padded at its bottom and right (`pad_to_window`, reflection when the
image is large enough, else edge replication) and the padding is cropped from the result.
"""

import numpy as np


def _starts(length, window, stride):
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def window_grid(height, width, tile_h, tile_w, overlap=0):
    """[(y, x)] top-left corners of tile_h x tile_w windows covering a height x width image.

    overlap: pixels shared by neighbouring windows (0 <= overlap < the tile side). For an image
    smaller than the window along an axis the only start is 0 (pad it first)."""
    tile_h, tile_w, overlap = int(tile_h), int(tile_w), int(overlap)
    if tile_h <= 0 or tile_w <= 0:
        raise ValueError("window sides must be positive, got {}x{}".format(tile_h, tile_w))
    if not 0 <= overlap < min(tile_h, tile_w):
        raise ValueError("overlap must be in [0, {}), got {}".format(min(tile_h, tile_w), overlap))
    ys = _starts(int(height), tile_h, tile_h - overlap)
    xs = _starts(int(width), tile_w, tile_w - overlap)
    return [(y, x) for y in ys for x in xs]


def pad_to_window(image, tile_h, tile_w):
    """(image padded at the bottom/right to at least tile_h x tile_w, (original h, original w)).

    image: (..., H, W) array (CHW, HW or HWC with channels_last=False is not supported: put the
    spatial axes last). Reflection needs the image to be larger than the padding; otherwise the
    edge pixel is repeated."""
    image = np.asarray(image)
    h, w = image.shape[-2], image.shape[-1]
    ph, pw = max(0, int(tile_h) - h), max(0, int(tile_w) - w)
    if not ph and not pw:
        return image, (h, w)
    pad = [(0, 0)] * (image.ndim - 2) + [(0, ph), (0, pw)]
    mode = "reflect" if ph < h and pw < w else "edge"
    return np.pad(image, pad, mode=mode), (h, w)


class Stitcher(object):
    """Sums window logits (C, tile_h, tile_w) into a (C, H, W) canvas and divides by how many
    windows covered each pixel: the average over overlapping windows."""

    def __init__(self, channels, height, width, dtype=np.float32):
        self.sum = np.zeros((int(channels), int(height), int(width)), dtype=dtype)
        self.count = np.zeros((int(height), int(width)), dtype=np.float32)

    def add(self, y, x, logits):
        logits = np.asarray(logits)
        th, tw = logits.shape[-2], logits.shape[-1]
        self.sum[:, y:y + th, x:x + tw] += logits
        self.count[y:y + th, x:x + tw] += 1.0

    def result(self):
        if not np.all(self.count > 0):
            raise ValueError("some pixels were covered by no window")
        return self.sum / self.count


def sliding_window(predict, image, tile_h, tile_w, overlap=0, batch=8):
    """Logits (C, H, W) of a whole image (C_in, H, W) from `predict`, a function of a batch of
    windows (N, C_in, tile_h, tile_w) -> logits (N, C, tile_h, tile_w) (numpy arrays).

    The sums are kept in float64 and the result has the logits' dtype: the mean of windows that
    agree on a pixel is then exactly their value (float32 sums of three or more round)."""
    image = np.asarray(image)
    tile_h, tile_w, batch = int(tile_h), int(tile_w), max(1, int(batch))
    padded, (h, w) = pad_to_window(image, tile_h, tile_w)
    grid = window_grid(padded.shape[-2], padded.shape[-1], tile_h, tile_w, overlap)
    stitcher, dtype = None, None
    for start in range(0, len(grid), batch):
        corners = grid[start:start + batch]
        windows = np.stack([padded[:, y:y + tile_h, x:x + tile_w] for y, x in corners])
        logits = np.asarray(predict(windows))
        if stitcher is None:
            stitcher = Stitcher(logits.shape[1], padded.shape[-2], padded.shape[-1], dtype=np.float64)
            dtype = logits.dtype if logits.dtype.kind == "f" else np.float32
        for (y, x), one in zip(corners, logits):
            stitcher.add(y, x, one)
    total, count = stitcher.sum[:, :h, :w], stitcher.count[:h, :w]
    if not np.all(count > 0):
        raise ValueError("some pixels were covered by no window")
    total /= count  # in place: a whole tile's float64 canvas is the largest array here
    return total.astype(dtype)
