"""Detection on the device: numpy NMS against torchvision, postprocessing, the detection task's decode /
scoring / agreement / eval files / COCO json predictions, letterbox preprocessing, YOLO folders."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from rsedge.runtime import preprocess
from rsedge.runtime.backends.base import Outputs
from rsedge.runtime.errors import RuntimeToolError
from rsedge.runtime.letterbox import LetterboxInfo, boxes_to_input, letterbox
from rsedge.runtime.nms import batched_nms, nms, postprocess
from rsedge.runtime.preprocess import PreprocessSpec
from rsedge.runtime.tasks import get_task
from rsedge.runtime.tasks.base import EvalOptions
from rsedge.runtime.tasks.detection import (
    Detections,
    DetectionTarget,
    as_target,
    detections_match,
    pack_eval_targets,
    unpack_eval_targets,
)

CLASSES = ["plane", "ship", "tank"]
META = {"task": "detection", "classes": CLASSES, "input_size": [64, 64], "mean": [0, 0, 0], "std": [1, 1, 1],
        "resize": "letterbox", "pad_value": 114}
TASK = get_task("detection")


def _random_boxes(rng, n, span=200.0, size=40.0):
    """Boxes in clusters, so that NMS has plenty to suppress."""
    centres = rng.uniform(0, span, (max(1, n // 8), 2))[rng.integers(0, max(1, n // 8), n)]
    xy = centres + rng.normal(0, size / 4, (n, 2))
    wh = rng.uniform(size / 2, size, (n, 2))
    return np.concatenate([xy - wh / 2, xy + wh / 2], axis=1).astype(np.float32)


# -- nms.py -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,threshold", [(0, 0.5), (1, 0.3), (2, 0.7), (3, 0.45)])
def test_nms_and_batched_nms_keep_what_torchvision_keeps(seed, threshold):
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    rng = np.random.default_rng(seed)
    boxes = _random_boxes(rng, 400)
    scores = rng.random(400).astype(np.float32)
    classes = rng.integers(0, 4, 400)
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    expected = ops.nms(tb, ts, threshold).numpy()
    kept = nms(boxes, scores, threshold)
    assert 20 < len(kept) < 380  # the case suppresses something and keeps something
    assert kept.tolist() == expected.tolist()  # same boxes, same (descending score) order
    expected = ops.batched_nms(tb, ts, torch.from_numpy(classes), threshold).numpy()
    kept = batched_nms(boxes, scores, classes, threshold)
    assert kept.tolist() == expected.tolist()
    assert len(kept) > len(nms(boxes, scores, threshold))  # classes do not suppress each other


def test_nms_edge_cases():
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    assert batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5).tolist() == []
    box = [0, 0, 10, 10]
    # equal scores: input order; max_keep: the first kept of a full run
    assert nms([box, box, [50, 50, 60, 60]], [0.5, 0.5, 0.5], 0.5).tolist() == [0, 2]
    boxes = [box, [20, 0, 30, 10], [40, 0, 50, 10], [41, 0, 51, 10]]
    assert nms(boxes, [0.9, 0.8, 0.7, 0.95], 0.5).tolist() == [3, 0, 1]
    assert nms(boxes, [0.9, 0.8, 0.7, 0.95], 0.5, max_keep=2).tolist() == [3, 0]
    # IoU exactly at the threshold is kept (suppression needs IoU > threshold), as torchvision
    assert nms([box, [5, 0, 15, 10]], [0.9, 0.8], 1 / 3.0).tolist() == [0, 1]
    with pytest.raises(ValueError, match="2 scores for 1 boxes"):
        nms([box], [0.1, 0.2], 0.5)


def test_postprocess_thresholds_multilabel_classes_and_max_det():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [100, 100, 110, 110]], np.float32)
    scores = np.array([[0.9, 0.0, 0.6],    # two classes pass: two detections of one box
                       [0.8, 0.0, 0.0],    # same class, IoU 0.82 with anchor 0: suppressed
                       [0.0, 0.3, 0.0],
                       [0.1, 0.0, 0.0]], np.float32)  # under the threshold
    b, s, c = postprocess(boxes, scores, 0.25, 0.5)
    assert c.tolist() == [0, 2, 1] and s.tolist() == pytest.approx([0.9, 0.6, 0.3])
    assert b.dtype == np.float32 and s.dtype == np.float32 and c.dtype == np.int64
    np.testing.assert_array_equal(b, boxes[[0, 0, 2]])
    b, s, c = postprocess(boxes, scores, 0.25, 0.5, class_agnostic=True)  # class 2 of anchor 0 suppressed too
    assert c.tolist() == [0, 1]
    b, s, c = postprocess(boxes, scores, 0.05, 0.5, max_det=2)
    assert c.tolist() == [0, 2] and len(b) == 2
    assert postprocess(boxes, scores, 0.05, 0.9)[2].tolist() == [0, 0, 2, 1, 0]  # IoU 0.82 < 0.9: both kept
    b, s, c = postprocess(boxes, scores, 0.95, 0.5)
    assert b.shape == (0, 4) and s.shape == (0,) and c.shape == (0,)
    # the candidate cap keeps the best scoring
    b, s, c = postprocess(boxes, scores, 0.05, 0.5, max_candidates=2)
    assert s.tolist() == pytest.approx([0.9]) and c.tolist() == [0]


def test_postprocess_is_fast_on_a_full_yolo_output_at_eval_threshold():
    rng = np.random.default_rng(0)
    boxes = _random_boxes(rng, 25200, span=640.0, size=60.0)
    scores = (rng.random((25200, 10)) ** 4).astype(np.float32)  # nearly every anchor and class passes 0.001
    postprocess(boxes[:100], scores[:100], 0.001, 0.6)
    t0 = time.perf_counter()
    b, s, c = postprocess(boxes, scores, 0.001, 0.6, max_det=300)
    seconds = time.perf_counter() - t0
    assert len(b) == 300 and np.all(np.diff(s) <= 0)
    assert seconds < 1.0, f"postprocess took {seconds:.2f} s"


# -- decode -------------------------------------------------------------------------------------------

def _raw_outputs():
    """Two images of 4 anchors x 3 classes: image 0 has a plane (0.9) and a weak ship (0.1), image 1 nothing."""
    boxes = np.zeros((2, 4, 4), np.float32)
    boxes[:, :, :] = [[4, 4, 20, 20], [5, 4, 21, 20], [30, 30, 50, 40], [0, 0, 8, 8]]
    scores = np.zeros((2, 4, 3), np.float32)
    scores[0, 0, 0], scores[0, 1, 0], scores[0, 2, 1] = 0.9, 0.85, 0.1
    scores[1, 3, 2] = 0.0005
    return {"boxes": boxes, "scores": scores}


def test_decode_uses_eval_thresholds_unless_asked_for_deployment():
    out = _raw_outputs()
    evald = TASK.decode(out, META)
    assert [d.classes.tolist() for d in evald] == [[0, 1], []]  # 0.001: the weak ship counts; NMS 0.6
    assert isinstance(evald[0], Detections) and evald[0].boxes.shape == (2, 4)
    deploy = TASK.decode(out, META, mode="deploy")
    assert [d.classes.tolist() for d in deploy] == [[0], []]
    meta = dict(META, eval_conf_threshold=0.0001, eval_iou_threshold=0.99, conf_threshold=0.05, max_det=2)
    assert [d.classes.tolist() for d in TASK.decode(out, meta)] == [[0, 0], [2]]
    assert [d.classes.tolist() for d in TASK.decode(out, meta, mode="deploy")] == [[0, 1], []]
    # unnamed outputs are taken by position
    assert TASK.decode({"o0": out["boxes"], "o1": out["scores"]}, META)[0].classes.tolist() == [0, 1]
    with pytest.raises(RuntimeToolError, match="metadata names 2"):
        TASK.decode(out, dict(META, classes=["a", "b"]))
    with pytest.raises(ValueError, match="'eval' or 'deploy'"):
        TASK.decode(out, META, mode="test")


def test_decode_reads_efficient_nms_outputs():
    out = {"num_dets": np.array([[3], [0]], np.int32),
           "det_boxes": np.zeros((2, 5, 4), np.float32),
           "det_scores": np.array([[0.9, 0.3, 0.01, 0.7, 0.6], [0.5] * 5], np.float32),
           "det_classes": np.array([[1, 2, 0, 0, 0], [1] * 5], np.int32)}
    out["det_boxes"][0, :3] = [[0, 0, 5, 5], [1, 1, 6, 6], [2, 2, 7, 7]]
    evald = TASK.decode(out, META)
    assert evald[0].classes.tolist() == [1, 2, 0] and evald[1].classes.tolist() == []  # padding rows ignored
    np.testing.assert_array_equal(evald[0].boxes, out["det_boxes"][0, :3])
    assert evald[0].classes.dtype == np.int64
    assert TASK.decode(out, META, mode="deploy")[0].classes.tolist() == [1, 2]  # 0.01 < 0.25
    assert TASK.decode(out, dict(META, max_det=1))[0].scores.tolist() == pytest.approx([0.9])


# -- scoring, agreement, eval files -------------------------------------------------------------------

def test_accumulator_scores_perfect_predictions_one_and_takes_host_targets():
    info = LetterboxInfo(32, 64, 1.0, 0, 16)
    gt = np.array([[2, 20, 12, 30], [30, 20, 50, 40], [5, 30, 9, 44]], np.float32)
    cls = np.array([0, 2, 0])
    acc = TASK.accumulator(META)
    acc.update([Detections(gt, np.array([0.9, 0.8, 0.7], np.float32), cls), Detections(gt[:1], [0.5], [1])],
               [DetectionTarget(gt, cls, info), np.array([[1, 2, 20, 12, 30]], np.float32)])  # host (K, 5)
    res = dict(acc.result(), task="detection")
    assert res["map50"] == pytest.approx(1.0) and res["map50_95"] == pytest.approx(1.0)
    assert res["primary"] == "map50" and res["n"] == 2 and (res["precision"], res["recall"]) == (1.0, 1.0)
    assert res["per_class"]["tank"]["ap50"] == pytest.approx(1.0)
    assert TASK.summary(res) == "mAP@0.5 100.00 %, mAP@0.5:0.95 100.00 % on 2 images"
    with pytest.raises(RuntimeToolError, match="no rsedge.classes"):
        TASK.accumulator({})
    rows = [[2, 0, 0, 10, 10], [1, 20, 20, 30, 30]]  # a list of two rows is rows, not (boxes, classes)
    assert as_target(rows).classes.tolist() == [2, 1] and as_target(rows).boxes.shape == (2, 4)
    assert as_target((np.zeros((1, 4)), [2])).classes.tolist() == [2]
    assert as_target(np.zeros((0, 5))).boxes.shape == (0, 4)


def test_predictions_are_clipped_to_the_image_before_scoring():
    info = LetterboxInfo(32, 64, 1.0, 0, 16)  # the image is rows 16..48 of the input
    gt = np.array([[10, 16, 30, 26]], np.float32)
    pred = np.array([[10, 0, 30, 26]], np.float32)  # 16 of its 26 rows are padding: IoU 0.38 unclipped
    acc = TASK.accumulator(META)
    acc.add(Detections(pred, [0.9], [0]), DetectionTarget(gt, [0], info))
    assert acc.result()["map50_95"] == pytest.approx(1.0)


def _det(boxes, classes):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return Detections(boxes, np.ones(len(boxes), np.float32), np.asarray(classes, np.int64))


def test_detections_match_one_to_one():
    a, b = [0, 0, 10, 10], [20, 0, 30, 10]
    assert detections_match(_det([], []), _det([], []))
    assert detections_match(_det([a, b], [0, 1]), _det([[21, 0, 31, 10], [1, 0, 11, 10]], [1, 0]))  # any order
    assert not detections_match(_det([a], [0]), _det([a], [1]))  # class differs
    assert not detections_match(_det([a], [0]), _det([[6, 0, 16, 10]], [0]))  # IoU 0.25
    assert not detections_match(_det([a], [0]), _det([a, b], [0, 0]))  # one extra
    assert not detections_match(_det([a, a], [0, 0]), _det([a, b], [0, 0]))  # b has no partner
    # greedy pairing (first candidate first) would fail; a perfect matching exists
    wide, left = [0, 0, 20, 10], [0, 0, 12, 10]
    assert detections_match(_det([wide, left], [0, 0]), _det([[0, 0, 14, 10], [0, 0, 24, 10]], [0, 0]))


def test_agreement_compares_deployment_detections():
    ref = _raw_outputs()
    same = {k: v.copy() for k, v in ref.items()}
    same["scores"][0, 2, 1] = 0.2  # a change under the deployment threshold is no disagreement
    assert TASK.agreement(ref, same, META) == 1.0
    moved = {k: v.copy() for k, v in ref.items()}
    moved["boxes"][0, :2] += 12  # the only detection (image 0's plane) moves by 12 px: IoU < 0.5
    assert TASK.agreement(ref, moved, META) == 0.0
    relabel = {k: v.copy() for k, v in ref.items()}
    relabel["scores"][0, :, :] = relabel["scores"][0, :, ::-1]
    assert TASK.agreement(ref, relabel, META) == 0.0


def test_agreement_is_the_f1_of_boxes_pooled_over_images(monkeypatch):
    from rsedge.runtime.tasks.detection import matched_detections

    a, b, c = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]
    assert matched_detections(_det([a, b, c], [0, 1, 0]), _det([b, a], [1, 0])) == 2
    runs = {"ref": [_det([a, b], [0, 1]), _det([c], [0]), _det([], [])],
            "cand": [_det([a], [0]), _det([c], [0]), _det([], [])]}  # one of four boxes lost
    monkeypatch.setattr(TASK, "decode", lambda outputs, meta, mode="eval": runs[outputs])
    assert TASK.agreement("ref", "cand", META) == pytest.approx(2 * 2 / 5)
    assert TASK.agreement("cand", "cand", META) == 1.0


def _eval_set(rng, n=6, size=(64, 64)):
    """Ground truth in input pixels of letterboxed images of various shapes, and their infos."""
    from rsedge.runtime.letterbox import letterbox_geometry

    boxes, classes, infos = [], [], []
    for i in range(n):
        h, w = [(40, 80), (100, 50), (64, 64), (30, 90), (120, 120), (70, 35)][i % 6]
        info = letterbox_geometry(h, w, size)[2]
        k = 0 if i == 2 else int(rng.integers(1, 5))  # image 2: a background image
        xy = rng.uniform(0, 0.7, (k, 2)) * [w, h]
        wh = rng.uniform(0.1, 0.3, (k, 2)) * [w, h]
        boxes.append(boxes_to_input(np.concatenate([xy, xy + wh], axis=1), info).astype(np.float32))
        classes.append(rng.integers(0, len(CLASSES), k))
        infos.append(info)
    return boxes, classes, infos


def _bundle(tmp_path, packed):
    os.makedirs(str(tmp_path / "eval"))
    entry = {"images": "eval/images.npy"}
    for key, array in packed.items():
        np.save(str(tmp_path / "eval" / (key + ".npy")), array)
        entry[key] = f"eval/{key}.npy"
    return entry


def test_pack_and_load_eval_targets_round_trip(tmp_path):
    boxes, classes, infos = _eval_set(np.random.default_rng(0))
    packed = pack_eval_targets(boxes, classes, infos)
    assert sorted(packed) == ["boxes", "classes", "counts", "letterbox"]
    assert packed["boxes"].dtype == np.float32 and packed["classes"].dtype == np.int64
    assert packed["counts"].dtype == np.int64 and packed["letterbox"].shape == (6, 5)
    assert packed["letterbox"].dtype == np.float64 and packed["counts"][2] == 0
    entry = _bundle(tmp_path, packed)
    targets = TASK.load_targets(str(tmp_path), entry)
    assert len(targets) == 6
    for t, b, c, info in zip(targets, boxes, classes, infos):
        np.testing.assert_array_equal(t.boxes, b)
        assert t.classes.tolist() == c.tolist() and t.letterbox.as_row() == info.as_row()
    assert len(TASK.load_targets(str(tmp_path), entry, limit=2)) == 2
    with pytest.raises(RuntimeToolError, match="inconsistent"):
        unpack_eval_targets(packed["boxes"][:-1], packed["classes"], packed["counts"], packed["letterbox"])
    with pytest.raises(ValueError, match="2 boxes but 1 classes"):
        pack_eval_targets([np.zeros((2, 4))], [[0]], [infos[0]])


# -- evaluate with --save-predictions, re-scored by faster-coco-eval ----------------------------------

class FakeLoop:
    """evaluate.RunnerLoop's face with canned outputs per image instead of a runner."""

    def __init__(self, outputs, meta, size=4):
        self.outputs, self.metadata, self.size = outputs, meta, size

        class Input:
            shape = (1, 3, meta["input_size"][0], meta["input_size"][1])

        self.input = Input()

    def chunks(self, images):
        for start in range(0, len(images), self.size):
            stop = min(start + self.size, len(images))
            yield start, stop, {k: v[start:stop] for k, v in self.outputs.items()}


def _noisy_outputs(rng, boxes, classes, infos, anchors=60):
    """Raw boxes / scores: each true box found with jitter (sometimes a wrong class), the rest random; the
    first true box's detection reaches 6 px into the padding above the image, some random ones too."""
    n = len(boxes)
    out_boxes = np.zeros((n, anchors, 4), np.float32)
    out_scores = np.zeros((n, anchors, len(CLASSES)), np.float32)
    for i in range(n):
        k = len(boxes[i])
        xy = rng.uniform(-8, 56, (anchors, 2))
        out_boxes[i] = np.concatenate([xy, xy + rng.uniform(4, 24, (anchors, 2))], axis=1)
        out_scores[i] = rng.random((anchors, len(CLASSES))) ** 3 * 0.5
        jitter = rng.normal(0, 1.0, (k, 4))
        out_boxes[i, :k] = boxes[i] + jitter
        cls = np.where(rng.random(k) < 0.8, classes[i], (classes[i] + 1) % len(CLASSES))
        out_scores[i, np.arange(k), cls] = rng.uniform(0.3, 1.0, k)
        if k and infos[i].pad_y:
            out_boxes[i, 0, 1] = infos[i].pad_y - 6
    return {"boxes": out_boxes, "scores": out_scores}


def _coco_scores(directory):
    fce = pytest.importorskip("faster_coco_eval")
    gt = fce.COCO(os.path.join(directory, "ground_truth.json"))
    ev = fce.COCOeval_faster(gt, gt.loadRes(os.path.join(directory, "predictions.json")), "bbox",
                             print_function=lambda *a: None)
    ev.evaluate()
    ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K) at area "all", 100 detections
    return float(precision[0][precision[0] > -1].mean()), float(precision[precision > -1].mean())


@pytest.mark.parametrize("seed", [0, 5])
def test_saved_predictions_rescore_to_the_same_map(tmp_path, seed):
    rng = np.random.default_rng(seed)
    boxes, classes, infos = _eval_set(rng, n=12)
    entry = _bundle(tmp_path / "bundle", pack_eval_targets(boxes, classes, infos))
    targets = TASK.load_targets(str(tmp_path / "bundle"), entry)
    loop = FakeLoop(_noisy_outputs(rng, boxes, classes, infos), META)
    seen = []
    options = EvalOptions(batch=4, save_predictions=str(tmp_path / "pred"), observe=lambda s, o: seen.append(s))
    res = TASK.evaluate(loop, np.zeros((12, 3, 64, 64), np.float32), targets, options)
    assert seen == [0, 4, 8] and res["task"] == "detection" and res["n"] == 12
    assert 0.2 < res["map50"] < 0.95  # neither trivial nor empty
    map50, map50_95 = _coco_scores(str(tmp_path / "pred"))
    assert res["map50"] == pytest.approx(map50, abs=1e-3)
    assert res["map50_95"] == pytest.approx(map50_95, abs=1e-3)
    assert res["postprocess_ms"] > 0 and res["postprocess_eval_ms"] > 0 and res["preprocess_ms"] > 0
    assert res["thresholds"]["eval"] == {"conf": 0.001, "iou": 0.6, "max_det": 300}
    assert res["predictions"]["images"] == 12
    with open(str(tmp_path / "pred" / "ground_truth.json")) as f:
        gt = json.load(f)
    assert gt["categories"][2] == {"id": 3, "name": "tank"}
    assert {"id": 1, "width": infos[0].width, "height": infos[0].height} == {
        k: gt["images"][0][k] for k in ("id", "width", "height")}
    first = [a for a in gt["annotations"] if a["image_id"] == 1]
    expected = boxes[0].astype(np.float64)
    expected = (expected - [infos[0].pad_x, infos[0].pad_y] * 2) / infos[0].scale  # original pixels
    np.testing.assert_allclose([a["bbox"] for a in first],
                               np.concatenate([expected[:, :2], expected[:, 2:] - expected[:, :2]], axis=1),
                               atol=2e-3)
    assert [a["category_id"] for a in first] == (classes[0] + 1).tolist()


# -- preprocessing ------------------------------------------------------------------------------------

def test_letterbox_preprocess_equals_letterbox_then_normalize():
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3)).astype(np.uint8)
    mean, std = np.array([0.1, 0.2, 0.3], np.float32), np.array([0.5, 0.6, 0.7], np.float32)
    spec = PreprocessSpec((64, 48), mean, std, resize="letterbox", pad_value=100)
    x, info = spec.prepare(image)
    boxed, expected_info = letterbox(image, (64, 48), 100)
    expected = ((boxed.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-6)
    assert x.shape == (3, 64, 48) and x.dtype == np.float32
    assert info.as_row() == expected_info.as_row() and info.pad_y > 0
    assert spec.letterbox_info(image).as_row() == info.as_row() == spec.letterbox_info((30, 50)).as_row()
    np.testing.assert_array_equal(spec(image), x)
    assert spec.to_dict()["pad_value"] == 100 and spec.to_dict()["resize"] == "letterbox"
    plain = PreprocessSpec((64, 48))
    assert plain.prepare(image)[1] is None and plain.letterbox_info(image) is None
    assert "pad_value" not in plain.to_dict()


def test_detection_metadata_keys_are_parsed():
    props = preprocess.to_metadata_props(dict(META, conf_threshold=0.3, iou_threshold=0.5, eval_conf_threshold=0.001,
                                              eval_iou_threshold=0.6, max_det=100))
    props["rsedge.pad_value"] = "114"
    meta = preprocess.normalize_metadata(props)
    assert meta["pad_value"] == 114 and meta["max_det"] == 100 and meta["conf_threshold"] == 0.3
    assert meta["eval_conf_threshold"] == 0.001 and meta["resize"] == "letterbox"
    spec = PreprocessSpec.from_metadata(meta)
    assert spec.resize == "letterbox" and spec.pad_value == 114
    assert PreprocessSpec.from_metadata({"input_size": [8, 8], "resize": "letterbox"}).pad_value == 114
    with pytest.raises(RuntimeToolError, match="conf_threshold must be a number in"):
        preprocess.normalize_metadata({"rsedge.conf_threshold": "1.5"})
    with pytest.raises(RuntimeToolError, match="iou_threshold must be a number in"):
        preprocess.normalize_metadata({"iou_threshold": "high"})
    with pytest.raises(RuntimeToolError, match="max_det must be an integer"):
        preprocess.normalize_metadata({"max_det": 2.5})
    with pytest.raises(RuntimeToolError, match="pad_value 300"):
        PreprocessSpec((8, 8), resize="letterbox", pad_value=300)


# -- image folders with YOLO labels -------------------------------------------------------------------

def _scene(h, w, box):
    """A dark image with one bright rectangle (x1, y1, x2, y2), and its YOLO label line."""
    image = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    return image, f"1 {(x1 + x2) / 2.0 / w} {(y1 + y2) / 2.0 / h} {(x2 - x1) / float(w)} {(y2 - y1) / float(h)}\n"


class BrightBoxRunner:
    """A stand-in detector: one "ship" box around the input's bright pixels (over 0.9)."""

    def __init__(self, meta):
        self.metadata = meta

    def inputs(self):
        class Input:
            shape, dtype = (1, 3, 64, 64), np.float32

        return [Input()]

    def batch_range(self):
        return 1, None

    def infer(self, x):
        boxes = np.zeros((len(x), 1, 4), np.float32)
        scores = np.zeros((len(x), 1, len(CLASSES)), np.float32)
        for i, image in enumerate(x):
            ys, xs = np.nonzero(image.min(axis=0) > 0.9)
            if len(ys):
                boxes[i, 0] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                scores[i, 0, 1] = 0.9
        return Outputs(["boxes", "scores"], [boxes, scores])


def test_folder_with_yolo_labels_is_scored_through_the_letterbox(tmp_path):
    from rsedge.runtime.evaluate import evaluate_folder_with

    for sub, name, (h, w, box) in [("images", "a", (40, 80, (10, 5, 40, 25))),
                                   ("images/deep", "b", (90, 45, (5, 50, 30, 80)))]:
        os.makedirs(str(tmp_path / sub), exist_ok=True)
        os.makedirs(str(tmp_path / sub.replace("images", "labels")), exist_ok=True)
        image, line = _scene(h, w, box)
        np.save(str(tmp_path / sub / (name + ".npy")), image)
        with open(str(tmp_path / sub.replace("images", "labels") / (name + ".txt")), "w") as f:
            f.write(line + ("garbage line\n" if name == "a" else ""))
    np.save(str(tmp_path / "images" / "empty.npy"), np.zeros((20, 20, 3), np.uint8))  # background, no label
    meta = {k: v for k, v in META.items() if k != "resize"}  # a detector without rsedge.resize: letterbox
    items, used, note = TASK.folder_items(str(tmp_path), meta)
    assert used["resize"] == "letterbox" and len(items) == 3
    target = dict((os.path.basename(p), t) for p, t in items)["a.npy"]
    np.testing.assert_allclose(target.boxes, boxes_to_input([[10, 5, 40, 25]], target.letterbox), atol=1e-4)
    assert note == "1 images without labels (background); 1 malformed label lines (skipped)"
    res = evaluate_folder_with(BrightBoxRunner(META), str(tmp_path), batch=2)
    assert res["map50"] == pytest.approx(1.0) and res["n"] == 3 and res["preprocess"]["resize"] == "letterbox"
    assert TASK.reads_folders()
    with pytest.raises(RuntimeToolError, match="no YOLO labels found"):
        TASK.folder_items(str(_unlabelled(tmp_path)), META)
    with pytest.raises(RuntimeToolError, match="rsedge.resize 'resize'"):
        TASK.folder_items(str(tmp_path), dict(META, resize="resize"))


def test_bundle_eval_set_through_the_runner_loop(tmp_path):
    """load_eval_arrays + evaluate_eval_set with a runner: letterboxed scenes, targets packed as a bundle has them."""
    from rsedge.runtime.evaluate import evaluate_eval_set, load_eval_arrays

    spec = PreprocessSpec.from_metadata(META)
    images, boxes, infos = [], [], []
    for h, w, box in [(40, 80, (10, 5, 40, 25)), (90, 45, (5, 50, 30, 80)), (64, 64, (0, 0, 20, 64))]:
        x, info = spec.prepare(_scene(h, w, box)[0])
        images.append(x)
        boxes.append(boxes_to_input([box], info))
        infos.append(info)
    entry = _bundle(tmp_path, pack_eval_targets(boxes, [[1]] * 3, infos))
    np.save(str(tmp_path / "eval" / "images.npy"), np.stack(images))
    x, targets = load_eval_arrays(str(tmp_path), {"eval": entry}, task=TASK)
    assert x.shape == (3, 3, 64, 64) and len(targets) == 3
    res = evaluate_eval_set(BrightBoxRunner(META), x, targets, task=TASK, options=EvalOptions(batch=2))
    assert res["map50"] == pytest.approx(1.0) and res["n"] == 3 and res["per_class"]["ship"]["n_true"] == 3


def _unlabelled(tmp_path):
    folder = tmp_path / "plain"
    os.makedirs(str(folder))
    np.save(str(folder / "x.npy"), np.zeros((8, 8, 3), np.uint8))
    return folder


# -- Python 3.6 ---------------------------------------------------------------------------------------

def test_detection_runtime_files_run_on_python_36():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")
    if not os.path.exists(vermin):
        pytest.skip("vermin is not installed")
    files = [os.path.join(root, "runtime", *p.split("/")) for p in ("nms.py", "tasks/detection.py", "preprocess.py")]
    proc = subprocess.run([vermin, "-q", "--no-tips", "--violations", "-t=3.6-", "--eval-annotations"] + files,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout
