"""runtime/tiling.py: window grids, padding, stitching, and sliding-window prediction that is exact
where the model is (a constant model, and a per-pixel function), with overlaps and odd sizes."""

import numpy as np
import pytest

from rsedge.runtime.tiling import Stitcher, pad_to_window, sliding_window, window_grid


def test_grid_steps_by_tile_minus_overlap_and_the_last_window_is_flush():
    grid = window_grid(100, 70, 32, 32, overlap=8)
    ys = sorted({y for y, _ in grid})
    xs = sorted({x for _, x in grid})
    assert ys == [0, 24, 48, 68] and xs == [0, 24, 38]
    assert grid == [(y, x) for y in ys for x in xs]  # row-major order
    assert window_grid(64, 64, 32, 32) == [(0, 0), (0, 32), (32, 0), (32, 32)]  # exact fit: no extra window
    assert window_grid(32, 32, 32, 32, overlap=31) == [(0, 0)]
    assert window_grid(20, 50, 32, 32) == [(0, 0), (0, 18)]  # smaller than the window along H: start 0 only
    assert window_grid(40, 96, 40, 32, overlap=0) == [(0, 0), (0, 32), (0, 64)]  # rectangular windows


@pytest.mark.parametrize("height,width,th,tw,overlap", [
    (1, 1, 1, 1, 0), (45, 70, 32, 32, 8), (97, 33, 32, 16, 15), (500, 509, 128, 96, 31), (64, 65, 32, 32, 0)])
def test_grid_covers_every_pixel_inside_the_image_with_at_least_the_overlap(height, width, th, tw, overlap):
    grid = window_grid(height, width, th, tw, overlap)
    covered = np.zeros((height, width), dtype=int)
    for y, x in grid:
        assert 0 <= y and y + th <= height and 0 <= x and x + tw <= width  # no window hangs over the edge
        covered[y:y + th, x:x + tw] += 1
    assert covered.min() >= 1
    assert len(set(grid)) == len(grid)
    for starts, tile, length in ((sorted({y for y, _ in grid}), th, height), (sorted({x for _, x in grid}), tw, width)):
        assert starts[0] == 0 and starts[-1] == length - tile
        steps = np.diff(starts)
        assert np.all(steps <= tile - overlap) and np.all(steps[:-1] == tile - overlap)


@pytest.mark.parametrize("args,message", [
    ((10, 10, 0, 4), r"window sides must be positive, got 0x4"),
    ((10, 10, 4, -1), r"window sides must be positive, got 4x-1"),
    ((10, 10, 8, 4, 4), r"overlap must be in \[0, 4\), got 4"),
    ((10, 10, 8, 8, -1), r"overlap must be in \[0, 8\), got -1"),
])
def test_grid_errors_say_what_is_wrong(args, message):
    with pytest.raises(ValueError, match=message):
        window_grid(*args)


def test_pad_to_window_reflects_or_repeats_the_edge_and_returns_the_original_size():
    image = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    padded, size = pad_to_window(image, 8, 9)
    assert size == (5, 7) and padded.shape == (2, 8, 9)
    assert np.array_equal(padded, np.pad(image, [(0, 0), (0, 3), (0, 2)], mode="reflect"))
    assert np.array_equal(padded[:, :5, :7], image)  # the image stays at the top left
    same, size = pad_to_window(image, 4, 7)
    assert same is image and size == (5, 7)  # large enough: untouched
    tiny = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    padded, size = pad_to_window(tiny, 5, 3)  # a pad larger than the image cannot reflect: the edge repeats
    assert size == (2, 2) and padded.shape == (5, 3)
    assert padded.tolist() == [[1, 2, 2], [3, 4, 4], [3, 4, 4], [3, 4, 4], [3, 4, 4]]


def test_stitcher_averages_overlaps_and_refuses_uncovered_pixels():
    st = Stitcher(1, 2, 3)
    st.add(0, 0, np.full((1, 2, 2), 2.0))
    st.add(0, 1, np.full((1, 2, 2), 4.0))
    assert st.result()[0].tolist() == [[2.0, 3.0, 4.0], [2.0, 3.0, 4.0]]
    gap = Stitcher(2, 3, 3)
    gap.add(0, 0, np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="covered by no window"):
        gap.result()


def _recording(model, calls):
    def predict(windows):
        calls.append(windows.shape)
        return model(windows)
    return predict


# not dyadic: float32 sums of three or more windows would round; the mean must still be exact
CONSTANTS = np.array([0.1, -1.0 / 3.0, 3.7e5, 0.0], dtype=np.float32)


def _constant_model(windows):
    n, _, h, w = windows.shape
    return np.broadcast_to(CONSTANTS[None, :, None, None], (n, len(CONSTANTS), h, w)).copy()


def _pixel_model(windows):
    """Each output pixel a function of the input pixel alone (integers: sums and means stay exact)."""
    r, g, b = windows[:, 0], windows[:, 1], windows[:, 2]
    return np.stack([r, 2 * g - b, r * b - 7, np.maximum(r, g)], axis=1).astype(np.float32)


def _pixel_expected(image):
    r, g, b = image
    return np.stack([r, 2 * g - b, r * b - 7, np.maximum(r, g)]).astype(np.float32)


@pytest.mark.parametrize("height,width,overlap,batch", [
    (45, 70, 8, 3), (20, 33, 0, 8), (32, 32, 16, 1), (77, 101, 31, 64), (5, 3, 4, 2), (33, 31, 1, 5)])
def test_sliding_window_is_exact_for_a_constant_and_a_per_pixel_model(height, width, overlap, batch):
    rng = np.random.RandomState(height * width)
    image = rng.randint(0, 256, size=(3, height, width)).astype(np.float32)
    calls = []
    out = sliding_window(_recording(_constant_model, calls), image, 32, 32, overlap=overlap, batch=batch)
    assert out.shape == (4, height, width) and out.dtype == np.float32
    assert np.array_equal(out, np.broadcast_to(CONSTANTS[:, None, None], out.shape))
    padded_h, padded_w = max(height, 32), max(width, 32)
    n_windows = len(window_grid(padded_h, padded_w, 32, 32, overlap))
    assert sum(c[0] for c in calls) == n_windows and all(c[0] <= batch for c in calls)
    assert len(calls) == -(-n_windows // batch) and all(c[1:] == (3, 32, 32) for c in calls)
    out = sliding_window(_pixel_model, image, 32, 32, overlap=overlap, batch=batch)
    assert np.array_equal(out, _pixel_expected(image))


def test_sliding_window_keeps_float64_logits_and_treats_a_batch_below_one_as_one():
    image = np.zeros((3, 40, 40), dtype=np.float32)
    calls = []
    out = sliding_window(_recording(lambda w: np.ones((len(w), 2, 32, 32)) / 3.0, calls), image, 32, 32, 30, 0)
    assert out.dtype == np.float64 and np.allclose(out, 1 / 3.0, rtol=1e-15, atol=0)
    assert len(calls) == len(window_grid(40, 40, 32, 32, 30)) == 25 and all(c[0] == 1 for c in calls)


def test_sliding_window_on_rectangular_windows_and_a_non_square_image():
    image = np.arange(3 * 50 * 90, dtype=np.float32).reshape(3, 50, 90) % 251
    out = sliding_window(_pixel_model, image, 16, 48, overlap=15, batch=4)
    assert np.array_equal(out, _pixel_expected(image))


def test_sliding_window_averages_disagreeing_windows():
    """A model whose output depends on where the window is: overlapping pixels get the mean of the windows."""
    def position_model(windows):
        return windows[:, :1, :, :] * 0 + windows[:, 1:2, :1, :1]  # every pixel: the window's top-left column id

    xs = np.tile(np.arange(6, dtype=np.float32), (4, 1))
    image = np.stack([np.zeros_like(xs), xs, np.zeros_like(xs)])
    out = sliding_window(position_model, image, 4, 4, overlap=2, batch=8)
    assert window_grid(4, 6, 4, 4, 2) == [(0, 0), (0, 2)]
    assert out[0, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]  # windows at x = 0 (value 0) and x = 2 (value 2)
