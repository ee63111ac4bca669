"""trainer/synth_det.py: the synthetic detection set is deterministic, its boxes lie inside the
images and overlap little, trainer/detdata.py reads it as the YOLO layout (classes, boxes,
background images), and its bad labels show in the scan's report."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from rsedge.runtime.detmetrics import box_iou
from rsedge.trainer.detdata import make_detection_split, scan_detection
from rsedge.trainer.synth_det import (
    CLASSES,
    MAX_OVERLAP,
    render_detection_scene,
    write_synthetic_detection,
)

N, SIZE = 44, 160


def digest(root):
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("det_scenes")
    return root, write_synthetic_detection(root, n_images=N, size=SIZE, seed=0, progress=False)


def test_same_seed_same_bytes(tmp_path):
    a = write_synthetic_detection(tmp_path / "a", n_images=3, size=96, seed=5, progress=False)
    write_synthetic_detection(tmp_path / "b", n_images=3, size=96, seed=5, progress=False)
    write_synthetic_detection(tmp_path / "c", n_images=3, size=96, seed=6, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert a["images"] == 3 and a["classes"] == list(CLASSES) and a["bad_labels"] == {}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["data.yaml", "images", "labels"]
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert Image.open(tmp_path / "a" / "images" / "0000.png").size == (96, 96)


def test_the_scan_reads_classes_boxes_and_background_images(scenes):
    root, summary = scenes
    scan = scan_detection(root)
    assert scan.layout["kind"] == "yolo" and scan.layout["names"] == "data.yaml" and not scan.notes
    assert scan.classes == list(CLASSES)
    report = scan.report
    assert report["images"] == N and report["boxes"] == summary["boxes"] > 2 * N
    assert report["background_images"] == summary["background_images"] == 2  # images 10 and 30
    assert {k: report[k] for k in ("class_out_of_range", "degenerate", "clipped", "outside_dropped", "malformed",
                                   "labels_without_image")} == dict.fromkeys(
        ("class_out_of_range", "degenerate", "clipped", "outside_dropped", "malformed", "labels_without_image"), 0)
    per_class = np.bincount(np.concatenate([c for _, _, c in scan.items]), minlength=len(CLASSES))
    assert dict(zip(CLASSES, per_class.tolist())) == summary["per_class"]
    assert min(per_class) >= N * 3 / len(CLASSES) / 2  # every class well represented
    items = {rel: (b, c) for rel, b, c in scan.items}
    assert len(items["images/0010.png"][1]) == 0 and len(items["images/0030.png"][1]) == 0
    counts = [len(c) for _, _, c in scan.items]
    assert max(counts) <= 6 and min(counts) == 0 and min(counts[:10]) >= 1


def test_boxes_inside_sized_and_apart(scenes):
    root, _ = scenes
    scan = scan_detection(root)
    sides = []
    for _, boxes, _ in scan.items:
        assert np.all(boxes[:, :2] >= 1 - 1e-3) and np.all(boxes[:, 2:] <= SIZE - 1 + 1e-3)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        sides += np.maximum(w, h).tolist()
        iou = box_iou(boxes, boxes) - np.eye(len(boxes))
        assert len(boxes) < 2 or iou.max() < MAX_OVERLAP + 1e-3
    assert 10 - 1e-3 <= min(sides) and max(sides) <= 56 and np.median(sides) < 40


def test_the_labels_are_the_drawn_boxes():
    rng = np.random.default_rng([3, 1])
    image, boxes, classes = render_detection_scene(rng, 160, n_objects=6)
    again = render_detection_scene(np.random.default_rng([3, 1]), 160, n_objects=6)
    assert np.array_equal(image, again[0]) and np.array_equal(boxes, again[1])
    assert image.shape == (160, 160, 3) and image.dtype == np.uint8 and len(boxes) == len(classes) >= 4
    gray = image.astype(np.float32).mean(-1)
    for (x1, y1, x2, y2), c in zip(boxes, classes):
        inner = gray[int(np.ceil(y1)):int(y2), int(np.ceil(x1)):int(x2)]
        # every object has bright paint (hull, tank roof, plane) well above the ground's median
        assert inner.max() > np.median(gray) + 25, (c, inner.max(), np.median(gray))
    empty = render_detection_scene(np.random.default_rng(0), 160, n_objects=0)
    assert empty[1].shape == (0, 4) and empty[2].shape == (0,)


def test_bad_labels_are_counted_by_the_scan_and_the_split(tmp_path):
    summary = write_synthetic_detection(tmp_path, n_images=6, size=96, seed=1, progress=False, bad_labels=True)
    bad = summary["bad_labels"]
    assert bad == {"class_out_of_range": 1, "degenerate": 1, "malformed": 1, "labels_without_image": 1}
    scan = scan_detection(tmp_path)
    assert {k: scan.report[k] for k in bad} == bad
    assert scan.report["boxes"] == summary["boxes"] and scan.report["examples"]["labels_without_image"] == [
        "labels/0006.txt"]
    split = make_detection_split(tmp_path, test=0.5, progress=False)
    assert split["boxes"]["total"] == summary["boxes"] and split["counts"]["test"] == 3 and not split["skipped"]


def test_an_earlier_output_is_replaced_only_with_exist_ok_and_a_foreign_folder_never(tmp_path):
    out = tmp_path / "set"
    write_synthetic_detection(out, n_images=2, size=64, progress=False, bad_labels=True)
    with pytest.raises(FileExistsError, match="--exist-ok"):
        write_synthetic_detection(out, n_images=2, size=64, progress=False)
    write_synthetic_detection(out, n_images=1, size=64, progress=False, exist_ok=True)
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["0000.txt"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write"):
        write_synthetic_detection(out, n_images=1, size=64, progress=False, exist_ok=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "images" / "0000.png").is_file()
    with pytest.raises(ValueError, match="at least"):
        write_synthetic_detection(tmp_path / "small", n_images=1, size=32, progress=False)
