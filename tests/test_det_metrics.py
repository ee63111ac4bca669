"""The numpy COCO detection evaluator: hand-made cases and agreement with faster-coco-eval."""

import json

import numpy as np
import pytest

from rsedge.runtime.detmetrics import DetectionScore, box_iou

BOX = [10.0, 10.0, 50.0, 40.0]
OTHER = [60.0, 60.0, 90.0, 100.0]


def _score(*images, **kwargs):
    score = DetectionScore(kwargs.pop("num_classes", 1), **kwargs)
    for image in images:
        score.add(*image)
    return score.result()


def test_box_iou_has_no_plus_one():
    iou = box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    np.testing.assert_allclose(iou, [[50 / 150, 0.0, 1.0]])
    assert box_iou(np.zeros((0, 4)), [BOX]).shape == (0, 1)


def test_perfect_detector_scores_one():
    gt = np.array([BOX, OTHER])
    res = _score((gt, [0.9, 0.8], [0, 1], gt, [0, 1]), (gt[:1], [0.7], [1], gt[:1], [1]),
                 num_classes=2, class_names=["car", "ship"])
    assert res["map50"] == pytest.approx(1.0) and res["map50_95"] == pytest.approx(1.0)
    assert res["per_class"]["ship"] == {"ap50": 1.0, "ap50_95": 1.0, "n_true": 2}
    assert (res["precision"], res["recall"], res["n"], res["n_true"]) == (1.0, 1.0, 2, 3)
    assert res["primary"] == "map50"
    json.dumps(res)


def test_false_positive_ranked_above_the_true_positive_halves_ap():
    res = _score(([OTHER, BOX], [0.9, 0.8], [0, 0], [BOX], [0]))
    # recall 0 -> 1 with precision 0 then 0.5; made monotone, every recall point reads 0.5
    assert res["map50"] == pytest.approx(0.5)
    assert (res["precision"], res["recall"], res["score_threshold"]) == (0.5, 1.0, 0.8)


def test_a_missed_box_stops_the_curve_at_half_recall():
    res = _score(([BOX], [0.9], [0], [BOX, OTHER], [0, 0]))
    assert res["map50"] == pytest.approx(51 / 101)  # recall points 0, 0.01, ..., 0.5
    assert (res["precision"], res["recall"]) == (1.0, 0.5)


def test_class_without_ground_truth_is_left_out_of_the_mean():
    res = _score(([BOX, OTHER], [0.9, 0.3], [0, 1], [BOX], [0]), num_classes=2)
    assert res["map50"] == pytest.approx(1.0)
    assert res["per_class"]["1"] == {"ap50": None, "ap50_95": None, "n_true": 0}
    assert (res["precision"], res["recall"], res["score_threshold"]) == (1.0, 1.0, 0.9)


def test_loose_box_counts_only_at_low_iou_thresholds():
    loose = [10.0, 10.0, 50.0, 10.0 + 30.0 / 0.62]  # same x, BOX covers 30 of its 48.4 rows
    assert box_iou([loose], [BOX])[0, 0] == pytest.approx(0.62)
    res = _score(([loose], [0.5], [0], [BOX], [0]))
    assert res["map50"] == pytest.approx(1.0)
    assert res["map50_95"] == pytest.approx(0.3)  # matched at 0.50, 0.55 and 0.60


def test_detection_on_an_ignored_box_is_neither_true_nor_false():
    res = _score(([OTHER, BOX], [0.9, 0.8], [0, 0], [BOX, OTHER], [0, 0], [False, True]))
    assert res["map50"] == pytest.approx(1.0) and res["n_true"] == 1


def test_bad_input_is_refused():
    score = DetectionScore(2)
    with pytest.raises(ValueError, match="class ids"):
        score.add([BOX], [0.5], [2], [BOX], [0])
    with pytest.raises(ValueError, match="scores"):
        score.add([BOX], [0.5, 0.4], [0], [BOX], [0])
    with pytest.raises(ValueError, match="0.5"):
        DetectionScore(2, iou_thresholds=[0.75])


def _jitter(rng, box, scale):
    w, h = box[2] - box[0], box[3] - box[1]
    return box + rng.normal(0, scale, 4) * np.array([w, h, w, h])


def _random_images(rng, n_images=20, n_classes=3):
    """Ground truth, jittered detections (some missed, some duplicated) and false positives."""
    images = []
    for _ in range(n_images):
        n = rng.integers(0, 7)
        xy = rng.uniform(0, 400, (n, 2))
        gt = np.concatenate([xy, xy + rng.uniform(8, 80, (n, 2))], axis=1)
        gt_cls = rng.integers(0, n_classes, n)
        ignore = rng.random(n) < 0.1
        boxes, cls = [], []
        for box, c in zip(gt, gt_cls):
            for _ in range(rng.choice([0, 1, 1, 1, 2])):
                boxes.append(_jitter(rng, box, 0.08))
                cls.append(c if rng.random() > 0.1 else rng.integers(0, n_classes))
        for _ in range(rng.integers(0, 4)):
            xy = rng.uniform(0, 400, 2)
            boxes.append(np.concatenate([xy, xy + rng.uniform(8, 80, 2)]))
            cls.append(rng.integers(0, n_classes))
        boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        images.append((boxes, rng.random(len(boxes)), np.array(cls, dtype=np.int64), gt, gt_cls,
                       ignore))
    return images


def _reference(images, n_classes, max_dets):
    """faster-coco-eval's mAP@0.5 and mAP@0.5:0.95 (area "all", the given detection limit).

    Ignored truths are given an area outside COCO's "all" range, which COCO ignores exactly as
    DetectionScore treats `ignore` (not crowd).
    """
    fce = pytest.importorskip("faster_coco_eval")
    gts, dts = [], []
    for i, (boxes, scores, cls, gt, gt_cls, ignore) in enumerate(images, start=1):
        for box, c, ig in zip(gt, gt_cls, ignore):
            w, h = box[2] - box[0], box[3] - box[1]
            gts.append({"id": len(gts) + 1, "image_id": i, "category_id": int(c) + 1, "iscrowd": 0,
                        "bbox": [box[0], box[1], w, h], "area": 1e11 if ig else w * h})
        for box, s, c in zip(boxes, scores, cls):
            dts.append({"image_id": i, "category_id": int(c) + 1, "score": float(s),
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    coco_gt = fce.COCO({"images": [{"id": i, "width": 500, "height": 500}
                                   for i in range(1, len(images) + 1)],
                        "annotations": gts,
                        "categories": [{"id": c + 1, "name": str(c)} for c in range(n_classes)]})
    ev = fce.COCOeval_faster(coco_gt, coco_gt.loadRes(dts), "bbox", print_function=lambda *a: None)
    ev.params.maxDets = [max_dets]
    ev.evaluate()
    ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K)
    return (float(precision[0][precision[0] > -1].mean()),
            float(precision[precision > -1].mean()))


@pytest.mark.parametrize("seed,max_dets", [(0, 100), (1, 100), (2, 100), (3, 2)])
def test_agrees_with_faster_coco_eval(seed, max_dets):
    rng = np.random.default_rng(seed)
    images = _random_images(rng)
    map50, map50_95 = _reference(images, 3, max_dets)
    res = _score(*images, num_classes=3, max_dets=max_dets)
    assert res["map50"] == pytest.approx(map50, abs=1e-3)
    assert res["map50_95"] == pytest.approx(map50_95, abs=1e-3)
    assert 0.05 < res["map50_95"] < res["map50"] < 0.99  # the case is neither trivial nor empty
