"""trainer/tasks/det_plots.py: PR curves at IoU 0.5 on a hand-made case and against the numpy COCO
evaluator's AP50, and both figures written (also when there is nothing to draw)."""

import numpy as np
import pytest
from PIL import Image

from rsedge.runtime.detmetrics import DetectionScore
from rsedge.trainer.tasks.det_plots import plot_detections, plot_pr_curves, pr_curves

T1, T2 = [10, 10, 30, 30], [50, 50, 80, 70]


def _hand_case():
    """Class 0: image A has one true box, a hit (0.9) and a miss (0.8); image B one true box and
    a hit (0.7) -> by score TP, FP, TP. Class 1: one true box, never detected."""
    detections = [
        (np.array([[11, 10, 30, 31], [60, 0, 90, 20]]), np.array([0.9, 0.8]), np.array([0, 0])),
        (np.array([[50, 52, 80, 70]]), np.array([0.7]), np.array([0])),
    ]
    truths = [(np.array([T1]), np.array([0])), (np.array([T2, [0, 0, 5, 5]]), np.array([0, 1]))]
    return detections, truths


def _ap50_of(detections, truths, num_classes):
    score = DetectionScore(num_classes)
    for (b, s, c), (tb, tc) in zip(detections, truths):
        score.add(b, s, c, tb, tc)
    return [v["ap50"] for v in score.result()["per_class"].values()]


def test_hand_made_two_hits_one_miss():
    detections, truths = _hand_case()
    curves = pr_curves(detections, truths, num_classes=3)
    c0 = curves[0]
    np.testing.assert_allclose(c0["precision"], [1, 0.5, 2 / 3])
    np.testing.assert_allclose(c0["recall"], [0.5, 0.5, 1])
    np.testing.assert_allclose(c0["precision_envelope"], [1, 2 / 3, 2 / 3])
    np.testing.assert_allclose(c0["scores"], [0.9, 0.8, 0.7])
    # 101-point AP: recall 0..0.5 (51 points) at precision 1, 0.51..1 (50 points) at 2/3
    assert c0["ap"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12) and c0["n_true"] == 2
    assert curves[1]["ap"] == 0.0 and len(curves[1]["recall"]) == 0 and curves[1]["n_true"] == 1
    assert curves[2]["ap"] is None and curves[2]["n_true"] == 0
    ap50 = _ap50_of(detections, truths, 3)
    assert c0["ap"] == pytest.approx(ap50[0], abs=1e-6) and curves[1]["ap"] == pytest.approx(ap50[1], abs=1e-6)
    assert ap50[2] is None


def test_a_box_below_the_iou_threshold_is_a_miss_and_one_truth_is_matched_once():
    truths = [(np.array([T1]), np.array([0]))]
    half = [(np.array([[10, 10, 30, 30], [10, 10, 30, 30], [20, 10, 40, 30]]), np.array([0.5, 0.9, 0.8]),
             np.array([0, 0, 0]))]  # a duplicate and a box of IoU 1/3
    c0 = pr_curves(half, truths, 1)[0]
    np.testing.assert_allclose(c0["precision"], [1, 0.5, 1 / 3])
    np.testing.assert_allclose(c0["recall"], [1, 1, 1])
    assert pr_curves(half, truths, 1, iou=0.3)[0]["precision"][1] == 0.5  # the truth is taken: a miss


def test_ap_matches_the_numpy_coco_evaluator_on_random_cases():
    rng = np.random.default_rng(0)
    for trial in range(5):
        detections, truths = [], []
        for _ in range(8):
            m = int(rng.integers(0, 5))
            xy = rng.uniform(0, 150, (m, 2))
            tb = np.hstack([xy, xy + rng.uniform(8, 40, (m, 2))])
            tc = rng.integers(0, 3, m)
            jitter = tb + rng.normal(0, 4, tb.shape)
            xy = rng.uniform(0, 150, (3, 2))
            noise = np.hstack([xy, xy + rng.uniform(8, 40, (3, 2))])
            boxes = np.vstack([jitter, noise])
            classes = np.concatenate([np.where(rng.random(m) < 0.8, tc, rng.integers(0, 3, m)), rng.integers(0, 3, 3)])
            detections.append((boxes, rng.random(len(boxes)).round(2), classes))  # rounded: ties in score
            truths.append((tb, tc))
        ours = [c["ap"] for c in pr_curves(detections, truths, 3)]
        ref = _ap50_of(detections, truths, 3)
        for a, b in zip(ours, ref):
            assert (a is None and b is None) or a == pytest.approx(b, abs=1e-6), (trial, ours, ref)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="images of detections"):
        pr_curves([], [(np.zeros((0, 4)), np.zeros(0))], 1)


def _png(path):
    assert path.is_file() and path.stat().st_size > 2000
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100
        return np.asarray(im.convert("RGB"))


def test_plots_write_png_figures_and_say_when_empty(tmp_path):
    detections, truths = _hand_case()
    names = ["plane", "ship", "storage tank"]
    assert plot_pr_curves(pr_curves(detections, truths, 3), names, tmp_path / "pr.png", "test set") is True
    pr = _png(tmp_path / "pr.png")
    rng = np.random.default_rng(1)
    examples = [{"image": rng.integers(0, 255, (96, 128, 3), dtype=np.uint8), "boxes": np.asarray(b, float),
                 "scores": s, "classes": c, "truth_boxes": tb, "truth_classes": tc}
                for (b, s, c), (tb, tc) in zip(detections, truths)] * 4  # 8 examples: 6 are drawn
    examples.append({"image": np.zeros((64, 64, 3), np.uint8), "boxes": np.zeros((0, 4)), "scores": np.zeros(0),
                     "classes": np.zeros(0, int), "truth_boxes": np.zeros((0, 4)), "truth_classes": np.zeros(0, int)})
    assert plot_detections(examples, names, tmp_path / "det.png", "detections") is True
    det = _png(tmp_path / "det.png")
    assert det.shape[1] > det.shape[0]  # 3 columns, 2 rows
    assert plot_detections(examples[-1:], names, tmp_path / "one.png") is True
    _png(tmp_path / "one.png")
    assert plot_pr_curves(pr_curves([], [], 3), names, tmp_path / "pr_empty.png", "empty") is False
    assert plot_detections([], names, tmp_path / "det_empty.png", "empty") is False
    empty = _png(tmp_path / "pr_empty.png")
    assert _png(tmp_path / "det_empty.png").shape == empty.shape and not np.array_equal(empty, pr[: empty.shape[0]])
