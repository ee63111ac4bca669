"""Detection samples: letterbox round trip of boxes, the plain image is the device's letterbox,
augmentation keeps boxes valid and in place (a forced flip mirrors them), mosaic quadrants, the
collate, unreadable images skipped, anchor-fitting box sizes, seeded without global RNG."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from rsedge.runtime.letterbox import boxes_to_image, letterbox
from rsedge.runtime.preprocess import load_image
from rsedge.trainer.datasets import SkipUnreadable, Unreadable, UnreadableImage, collate_readable
from rsedge.trainer.det_datasets import AugmentOptions, DetectionImages, detection_collate

META = {"input_size": [64, 64], "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}}
STILL = dict(flip_lr=0.0, flip_ud=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0, saturation=0.0, hue=0.0)


def _write(path, w, h, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _set(tmp_path):
    """Three non-square PNGs (lossless: pixels compare exactly) with boxes, one without any."""
    specs = [("a.png", 200, 120, [[10, 20, 60, 50, 0], [150, 90, 190, 118, 2]]),
             ("b.png", 90, 160, [[5, 5, 40, 100, 1]]),
             ("sub/c.png", 128, 128, [])]
    for k, (rel, w, h, _) in enumerate(specs):
        _write(tmp_path / rel, w, h, k)
    return [[rel, rows] for rel, _, _, rows in specs]


def _mirror_x(boxes, w):
    out = boxes.clone()
    out[:, 0], out[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return out


def test_boxes_round_trip_through_the_letterbox(tmp_path):
    items = _set(tmp_path)
    ds = DetectionImages(tmp_path, items, META)
    for i, (_, rows) in enumerate(items):
        _, target = ds[i]
        assert target.dtype == torch.float32 and target.shape == (len(rows), 5)
        if rows:
            orig = np.asarray(rows, np.float64)
            back = boxes_to_image(target[:, 1:].numpy(), ds.info(i))
            assert np.abs(back - orig[:, :4]).max() <= 1.0
            assert target[:, 0].tolist() == orig[:, 4].tolist()
    assert ds.info(0).pad_y > 0 and ds.info(1).pad_x > 0  # wide and tall images are padded


def test_plain_image_is_the_runtime_letterbox_normalized(tmp_path):
    items = _set(tmp_path)
    for i in range(3):
        ref, info = letterbox(load_image(str(tmp_path / items[i][0])), (64, 64))
        ref = torch.from_numpy(ref.transpose(2, 0, 1).astype(np.float32) / 255)
        image, _ = DetectionImages(tmp_path, items, META)[i]
        assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
        assert torch.allclose(image, ref, atol=1e-6)
        assert DetectionImages(tmp_path, items, META).info(i).as_row() == info.as_row()
    meta = {"input_size": [64, 64], "normalization": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.5]}}
    image, _ = DetectionImages(tmp_path, items, meta)[2]
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.5]).view(3, 1, 1)
    assert torch.allclose(image, (ref - mean) / std, atol=1e-5)


@pytest.mark.parametrize("flip", ["lr", "ud"])
def test_forced_flip_mirrors_image_and_boxes(tmp_path, flip):
    items = _set(tmp_path)
    plain = DetectionImages(tmp_path, items, META)
    opts = AugmentOptions(**{**STILL, f"flip_{flip}": 1.0})
    flipped = DetectionImages(tmp_path, items, META, augment=True, options=opts)
    for i in range(2):
        (img0, t0), (img1, t1) = plain[i], flipped[i]
        if flip == "lr":
            assert torch.equal(img1, img0.flip(-1))
            assert torch.allclose(t1[:, 1:], _mirror_x(t0[:, 1:], 64), atol=1e-4)
        else:
            assert torch.equal(img1, img0.flip(-2))
            assert torch.allclose(t1[:, [1, 3]], t0[:, [1, 3]], atol=1e-4)
            assert torch.allclose(t1[:, [2, 4]], 64 - t0[:, [4, 2]], atol=1e-4)
        assert torch.equal(t1[:, 0], t0[:, 0])


def test_scale_and_translate_move_boxes_with_the_pixels(tmp_path):
    """A bright box on a dark image: after the affine its target box still frames the bright pixels."""
    img = np.zeros((64, 64, 3), np.uint8)
    img[20:36, 24:44] = 255
    Image.fromarray(img).save(tmp_path / "x.png")
    opts = AugmentOptions(**{**STILL, "scale": (0.6, 1.4), "translate": 0.1})
    ds = DetectionImages(tmp_path, [["x.png", [[24, 20, 44, 36, 0]]]], META, augment=True, options=opts)
    moved = 0
    for epoch in range(6):
        ds.set_epoch(epoch)
        image, target = ds[0]
        ys, xs = np.nonzero(image[0].numpy() > 0.5)
        bright = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert np.abs(target[0, 1:].numpy() - bright).max() <= 1.5
        moved += abs(float(target[0, 1]) - 24) > 1
    assert moved >= 3


def test_augmented_boxes_stay_valid_inside_the_canvas(tmp_path):
    items = _set(tmp_path)
    ds = DetectionImages(tmp_path, items, META, augment=True, mosaic=0.5, seed=3)
    total = 0
    for epoch in range(8):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, target = ds[i]
            assert image.shape == (3, 64, 64) and image.dtype == torch.float32
            assert target.shape[1] == 5 and target.dtype == torch.float32
            x1, y1, x2, y2 = target[:, 1:].unbind(1)
            assert bool(((x1 >= 0) & (y1 >= 0) & (x2 <= 64) & (y2 <= 64)).all())
            assert bool(((x2 - x1 >= 2) & (y2 - y1 >= 2)).all())
            assert set(target[:, 0].tolist()) <= {0.0, 1.0, 2.0}
            total += len(target)
    assert total > 0


def test_mostly_outside_and_tiny_boxes_are_dropped(tmp_path):
    _write(tmp_path / "x.png", 64, 64, 0)
    rows = [[0, 0, 20, 20, 0], [30, 30, 31, 31, 1], [40, 40, 60, 60, 2]]
    opts = AugmentOptions(**{**STILL, "translate": 0.25, "min_visible": 0.5})
    ds = DetectionImages(tmp_path, [["x.png", rows]], META, augment=True, options=opts)
    kept = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        _, target = ds[0]
        assert 1.0 not in target[:, 0].tolist()  # 1 px: always under min_size
        for _cls, x1, y1, x2, y2 in target.tolist():
            assert (x2 - x1) * (y2 - y1) >= 0.5 * 400 - 1e-3
        kept.append(0.0 in target[:, 0].tolist())
    assert any(kept) and not all(kept)  # the corner box is kept when it stays, dropped when it leaves


def test_seeded_by_seed_epoch_index_without_touching_global_rngs(tmp_path):
    items = _set(tmp_path)
    ds = DetectionImages(tmp_path, items, META, augment=True, mosaic=0.5, seed=7)
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    a = ds[0]
    b = DetectionImages(tmp_path, items, META, augment=True, mosaic=0.5, seed=7)[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state
    changed = 0
    for epoch in range(1, 4):
        ds.set_epoch(epoch)
        changed += not torch.equal(ds[0][0], a[0])
    assert changed == 3


def test_collate_with_an_image_without_boxes(tmp_path):
    items = _set(tmp_path)
    ds = DetectionImages(tmp_path, items, META)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=detection_collate)
    images, targets = next(iter(loader))
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    assert [t.shape for t in targets] == [(2, 5), (1, 5), (0, 5)]


def test_mosaic_puts_boxes_of_four_images_in_four_quadrants(tmp_path):
    items = []
    for k in range(4):
        _write(tmp_path / f"{k}.png", 100, 60, k)
        items.append([f"{k}.png", [[30, 15, 70, 45, k]]])
    ds = DetectionImages(tmp_path, items, META, augment=True, mosaic=1.0, options=AugmentOptions(**STILL))
    for index in range(4):
        image, target = ds[index]
        assert sorted(target[:, 0].tolist()) == [0.0, 1.0, 2.0, 3.0]
        quadrants = set()
        for cls, x1, y1, x2, y2 in target.tolist():
            qx, qy = int(x1 >= 32), int(y1 >= 32)
            assert (x2 <= 32 or qx) and (y2 <= 32 or qy)  # wholly inside one quadrant
            quadrants.add((qy, qx))
            quad, info = letterbox(load_image(str(tmp_path / f"{int(cls)}.png")), (32, 32))
            got = image[:, 32 * qy:32 * qy + 32, 32 * qx:32 * qx + 32]
            assert torch.allclose(got, torch.from_numpy(quad.transpose(2, 0, 1) / 255).float(), atol=1e-6)
            assert abs(x1 - 32 * qx - (30 * info.scale + info.pad_x)) < 1e-3
        assert len(quadrants) == 4


def test_unreadable_image_is_skipped_as_skipunreadable_expects(tmp_path):
    items = _set(tmp_path)
    (tmp_path / "b.png").write_bytes(b"not a png any more")
    ds = DetectionImages(tmp_path, items, META)
    with pytest.raises(UnreadableImage, match="b.png"):
        ds[1]
    batch = [SkipUnreadable(ds)[i] for i in range(3)]
    assert isinstance(batch[1], Unreadable) and batch[1].path.endswith("b.png")
    (images, targets), skipped = collate_readable(batch, detection_collate)
    assert images.shape == (2, 3, 64, 64) and [len(t) for t in targets] == [2, 0]
    assert len(skipped) == 1 and "b.png" in skipped[0]
    mosaic = DetectionImages(tmp_path, items, META, augment=True, mosaic=1.0, options=AugmentOptions(**STILL))
    assert set(mosaic[0][1][:, 0].tolist()) == {0.0, 2.0}  # the unreadable partner's quadrant is empty
    with pytest.raises(UnreadableImage):
        mosaic[1]


def test_boxes_wh_are_the_label_sizes_scaled_by_the_letterbox(tmp_path):
    items = _set(tmp_path)
    ds = DetectionImages(tmp_path, items, META)
    expected = [[50 * 0.32, 30 * 0.32], [40 * 0.32, 28 * 0.32], [35 * 0.4, 95 * 0.4]]
    assert ds.boxes_wh().dtype == np.float32
    assert np.allclose(ds.boxes_wh(), expected, atol=1e-4)
    for i in range(2):
        assert np.allclose(ds[i][1][:, 3:] - ds[i][1][:, 1:3], ds.boxes_wh()[[0, 1] if i == 0 else [2]], atol=1e-4)
    (tmp_path / "a.png").write_bytes(b"")
    assert np.allclose(DetectionImages(tmp_path, items, META).boxes_wh(), expected[2:], atol=1e-4)
