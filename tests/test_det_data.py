"""Detection datasets on the host: NWPU, YOLO and COCO layouts, bad labels counted, the split."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsedge.trainer.datasets import DatasetError
from rsedge.trainer.detdata import (
    NWPU_CLASSES,
    DetLayout,
    make_detection_split,
    read_names,
    read_nwpu_label,
    scan_detection,
)

NWPU_REAL = Path("/work/shared/data/nwpu_vhr10")


def _img(path: Path, size=(100, 80)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 60)).save(path)


def _items(scan):
    return {rel: (b.tolist(), c.tolist()) for rel, b, c in scan.items}


def test_read_nwpu_label_spaces_blank_lines_and_class_mapping(tmp_path):
    p = tmp_path / "001.txt"
    p.write_text("(563,478),(630,573),1\n\n( 10 , 20 ) , ( 30 , 40 ) , 10 \r\n   \n(1,2),(3,4),5\n")
    assert read_nwpu_label(p) == [(563, 478, 630, 573, 0), (10, 20, 30, 40, 9), (1, 2, 3, 4, 4)]
    assert len(NWPU_CLASSES) == 10 and NWPU_CLASSES[0] == "airplane" and NWPU_CLASSES[9] == "vehicle"


def _nwpu(root: Path) -> None:
    _img(root / "positive image set" / "001.jpg")
    _img(root / "positive image set" / "002.jpg")
    _img(root / "positive image set" / "003.jpg")  # no label file: background
    gt = root / "ground truth"
    gt.mkdir(parents=True)
    (gt / "001.txt").write_text(
        "(10,10),(20,30),1\n"       # good
        "(10,10),(20,30),11\n"      # class out of range
        "(10,10),(10,30),2\n"       # degenerate (zero width)
        "(90,70),(120,95),3\n"      # clipped to (90,70,100,80)
        "(150,10),(160,20),4\n"     # wholly outside: dropped
        "garbage line\n"            # malformed
    )
    (gt / "002.txt").write_text("(0,0),(5,5),10\n")
    (gt / "004.txt").write_text("(0,0),(5,5),1\n")  # no image


def test_nwpu_every_bad_label_kind_is_counted(tmp_path):
    _nwpu(tmp_path)
    scan = scan_detection(tmp_path)
    assert scan.layout["kind"] == "nwpu" and scan.classes == NWPU_CLASSES
    items = _items(scan)
    assert items["positive image set/001.jpg"] == ([[10, 10, 20, 30], [90, 70, 100, 80]], [0, 2])
    assert items["positive image set/002.jpg"] == ([[0, 0, 5, 5]], [9])
    assert items["positive image set/003.jpg"] == ([], [])
    r = scan.report
    kinds = ("class_out_of_range", "degenerate", "clipped", "outside_dropped", "malformed")
    assert [r[k] for k in kinds] == [1, 1, 1, 1, 1]
    assert r["labels_without_image"] == 1 and r["examples"]["labels_without_image"] == ["ground truth/004.txt"]
    assert r["background_images"] == 1 and r["examples"]["background_images"] == ["positive image set/003.jpg"]
    assert r["images"] == 3 and r["boxes"] == 3
    b = scan.items[0][1]
    assert b.dtype == np.float32 and b.shape == (2, 4) and scan.items[0][2].dtype == np.int64


def _yolo(root: Path) -> None:
    _img(root / "images" / "a.jpg", (200, 100))
    _img(root / "images" / "sub" / "b.png", (50, 50))
    _img(root / "images" / "c.jpg")  # no label file
    lab = root / "labels"
    (lab / "sub").mkdir(parents=True)
    (lab / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.95 0.5 0.2 0.2\n\n"  # good, clipped, blank
                               "2 0.5 0.5 0.1 0.1\n1 0.5 0.5 0 0.1\n1 x 0.5 0.1 0.1\n")  # class, degenerate, malformed
    (lab / "sub" / "b.txt").write_text("1 0.5 0.5 1 1\n")
    (lab / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")


def test_yolo_normalized_to_pixels_names_from_dot_names(tmp_path):
    _yolo(tmp_path)
    (tmp_path / "obj.names").write_text("plane\nship\n")
    scan = scan_detection(tmp_path)
    assert scan.layout["kind"] == "yolo" and scan.layout["names"] == "obj.names"
    assert scan.classes == ["plane", "ship"]
    items = _items(scan)
    boxes, classes = items["images/a.jpg"]
    np.testing.assert_allclose(boxes, [[80, 30, 120, 70], [170, 40, 200, 60]], atol=1e-3)  # 2nd clipped at x=200
    assert classes == [0, 1]
    assert items["images/sub/b.png"] == ([[0, 0, 50, 50]], [1])
    assert items["images/c.jpg"] == ([], [])
    r = scan.report
    assert (r["class_out_of_range"], r["degenerate"], r["clipped"], r["malformed"]) == (1, 1, 1, 1)
    assert r["labels_without_image"] == 1 and r["background_images"] == 1


@pytest.mark.parametrize("yaml_text", [
    "path: .\nnames: [plane, ship, tank]\n",
    "names:\n  - plane\n  - ship\n  - tank\n",
    "names:\n  0: plane\n  1: ship\n  2: tank\n",
])
def test_yolo_names_from_data_yaml(tmp_path, yaml_text):
    _yolo(tmp_path)
    (tmp_path / "data.yaml").write_text(yaml_text)
    scan = scan_detection(tmp_path)
    assert scan.classes == ["plane", "ship", "tank"] and scan.layout["names"] == "data.yaml"
    assert _items(scan)["images/a.jpg"][1] == [0, 1, 2] and scan.report["class_out_of_range"] == 0


def test_yolo_names_option_and_beside_layout_without_names(tmp_path):
    _img(tmp_path / "x" / "p.jpg", (100, 100))
    (tmp_path / "x" / "p.txt").write_text("3 0.5 0.5 0.5 0.5\n")
    scan = scan_detection(tmp_path)
    assert scan.layout["mode"] == "beside" and scan.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert scan.notes and _items(scan)["x/p.jpg"] == ([[25, 25, 75, 75]], [3])
    names = tmp_path.parent / f"{tmp_path.name}_my.names"
    names.write_text("a\nb\n")
    scan = scan_detection(tmp_path, DetLayout(names=str(names)))
    assert scan.classes == ["a", "b"] and scan.report["class_out_of_range"] == 1
    with pytest.raises(DatasetError, match="not found"):
        scan_detection(tmp_path, DetLayout(names="nope.names"))


def test_read_names_yaml_map_with_gap(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text("names:\n  0: a\n  2: c\n")
    assert read_names(p) == ["a", "class_1", "c"]


def test_coco_category_ids_are_made_contiguous(tmp_path):
    _img(tmp_path / "images" / "a.jpg", (100, 80))
    _img(tmp_path / "images" / "b.jpg", (100, 80))
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 8, "file_name": "b.jpg", "width": 100, "height": 80},
                   {"id": 9, "file_name": "missing.jpg", "width": 100, "height": 80}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 90, "bbox": [10, 10, 20, 30]},
                        {"id": 2, "image_id": 7, "category_id": 3, "bbox": [90, 0, 20, 10]},
                        {"id": 3, "image_id": 7, "category_id": 4, "bbox": [1, 1, 5, 5]},
                        {"id": 4, "image_id": 7, "category_id": 3, "bbox": [1, 1, 0, 5]},
                        {"id": 5, "image_id": 7, "category_id": 3, "bbox": [1, 1]}],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances.json").write_text(json.dumps(coco))
    scan = scan_detection(tmp_path)
    assert scan.layout["kind"] == "coco" and scan.classes == ["car", "toothbrush"]
    assert scan.layout["category_ids"] == [3, 90]
    items = _items(scan)
    assert items["images/a.jpg"] == ([[10, 10, 30, 40], [90, 0, 100, 10]], [1, 0])
    assert items["images/b.jpg"] == ([], [])
    r = scan.report
    assert (r["class_out_of_range"], r["degenerate"], r["clipped"], r["malformed"]) == (1, 1, 1, 1)
    assert r["labels_without_image"] == 1 and r["background_images"] == 1


def test_no_layout_is_a_one_line_error(tmp_path):
    _img(tmp_path / "a.jpg")
    with pytest.raises(DatasetError, match="no detection layout recognised") as e:
        scan_detection(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(DatasetError, match="does not exist"):
        scan_detection(tmp_path / "nope")


def _many(root: Path, n: int = 20) -> None:
    for i in range(n):
        _img(root / "images" / f"{i:02d}.jpg", (32, 32))
        (root / "labels").mkdir(exist_ok=True)
        (root / "labels" / f"{i:02d}.txt").write_text(f"{i % 2} 0.5 0.5 0.5 0.5\n")
    (root / "classes.txt").write_text("a\nb\n")


def test_split_by_image_is_seeded_80_20_and_json_round_trips(tmp_path):
    _many(tmp_path)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "labels" / "broken.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    split = make_detection_split(tmp_path, progress=False)
    assert split["task"] == "detection" and split["format"] == "rsedge-split/1"
    assert split["counts"] == {"train": 16, "val": 0, "test": 4}
    assert [s["path"] for s in split["skipped"]] == ["images/broken.jpg"]
    rels = [rel for part in ("train", "val", "test") for rel, _ in split[part]]
    assert sorted(rels) == [f"images/{i:02d}.jpg" for i in range(20)]
    assert split["boxes"] == {"total": 20, "per_class": [10, 10]}
    assert split["train"][0][1] == [[8.0, 8.0, 24.0, 24.0, int(split["train"][0][0][-5]) % 2]]
    assert make_detection_split(tmp_path, progress=False) == split
    other = make_detection_split(tmp_path, seed=1, progress=False)
    assert [r for r, _ in other["test"]] != [r for r, _ in split["test"]]
    assert json.loads(json.dumps(split)) == split
    assert DetLayout.from_dict(split["layout"]) == DetLayout()
    three = make_detection_split(tmp_path, val=0.1, test=0.2, seed=3, progress=False)
    assert three["counts"] == {"train": 14, "val": 2, "test": 4}


@pytest.mark.slow
@pytest.mark.skipif(not NWPU_REAL.is_dir(), reason="NWPU VHR-10 not present")
def test_real_nwpu_vhr10():
    split = make_detection_split(NWPU_REAL, progress=False)
    assert split["layout"]["kind"] == "nwpu" and split["classes"] == NWPU_CLASSES
    assert split["counts"] == {"train": 520, "val": 0, "test": 130} and split["skipped"] == []
    assert split["boxes"]["total"] == 3896 and all(n > 0 for n in split["boxes"]["per_class"])
    r = split["report"]
    assert r["images"] == 650 and r["labels_without_image"] == 0 and r["malformed"] == 0
