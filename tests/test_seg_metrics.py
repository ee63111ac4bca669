"""runtime/segmetrics.py against hand-computed cases: confusion, IoU and accuracies, the ignore label,
absent classes, boundary F1 on a shifted square, and the exact distance test it rests on."""

import json
import math

import numpy as np
import pytest

from rsedge.runtime import segmetrics as S

TRUTH = np.array([[0, 0, 1, 1],
                  [0, 0, 1, 1],
                  [2, 2, 255, 1]])
PRED = np.array([[0, 1, 1, 1],
                 [0, 0, 1, 0],
                 [2, 0, 1, 1]])


def test_confusion_counts_truth_rows_and_skips_the_ignore_label():
    cm = S.confusion(TRUTH, PRED, 3)
    assert cm.dtype == np.int64 and cm.tolist() == [[3, 1, 0], [1, 4, 0], [1, 0, 1]]
    truth = TRUTH.copy()
    truth[0, 0] = 7  # outside the classes: not counted either
    assert S.confusion(truth, PRED, 3).tolist() == [[2, 1, 0], [1, 4, 0], [1, 0, 1]]
    assert S.confusion(TRUTH, PRED, 3, ignore_index=None).sum() == 11  # 255 >= 3: still not counted
    with pytest.raises(ValueError, match="shape"):
        S.confusion(TRUTH, PRED[:2], 3)
    with pytest.raises(ValueError, match="predicted class 3 outside 0..2"):
        S.confusion(TRUTH, np.full_like(PRED, 3), 3)


def test_scores_from_confusion_by_hand():
    s = S.scores_from_confusion(S.confusion(TRUTH, PRED, 3), ["a", "b", "c"])
    assert s["global_accuracy"] == pytest.approx(8 / 11)
    assert s["mean_accuracy"] == pytest.approx((3 / 4 + 4 / 5 + 1 / 2) / 3)
    # IoU = tp / (truth + pred - tp): a 3/(4+5-3), b 4/(5+5-4), c 1/(2+1-1)
    assert s["per_class"]["a"] == {"iou": pytest.approx(0.5), "accuracy": pytest.approx(0.75), "pixels": 4}
    assert s["per_class"]["b"]["iou"] == pytest.approx(2 / 3) and s["per_class"]["c"]["iou"] == pytest.approx(0.5)
    assert s["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert s["fwiou"] == pytest.approx(4 / 11 * 0.5 + 5 / 11 * 2 / 3 + 2 / 11 * 0.5)


def test_absent_classes_are_left_out_of_the_means_and_undefined_values_are_none():
    truth = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 3], [1, 1]])  # class 3 predicted but never true; class 2 nowhere
    s = S.scores_from_confusion(S.confusion(truth, pred, 4))
    assert s["per_class"]["2"] == {"iou": None, "accuracy": None, "pixels": 0}
    assert s["per_class"]["3"] == {"iou": 0.0, "accuracy": None, "pixels": 0}
    assert s["miou"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # over the classes with a non-empty union
    assert s["mean_accuracy"] == pytest.approx((0.5 + 1.0) / 2)  # over the classes present in the truth
    empty = S.scores_from_confusion(np.zeros((2, 2), np.int64))
    assert empty["miou"] is None and empty["global_accuracy"] is None and empty["fwiou"] is None


def _square(shift=0, size=10):
    m = np.zeros((size, size), np.uint8)
    m[2:6, 2 + shift:6 + shift] = 1
    return m


def test_boundary_f1_of_a_square_shifted_by_one_pixel():
    """Truth: a 4x4 square at rows 2-5, cols 2-5; prediction: the same square one column right.

    Square boundary (its 12 outer pixels): the two rings share rows 2 and 5 at cols 3-5, 6 pixels:
    P = R = 6/12, BF 0.5. Background boundary (its 16 pixels 4-adjacent to the square): shared
    are rows 1 and 6 at cols 3-5, 6 pixels: P = R = 6/16, BF 0.375. Every pixel of one ring is one
    pixel from the other, so any tolerance >= 1 px matches all of them."""
    truth, pred = _square(), _square(1)
    assert S.boundary_f1(truth, pred, 2, tolerance=0) == {0: 0.375, 1: 0.5}
    assert S.boundary_f1(truth, pred, 2, tolerance=0.9) == {0: 0.375, 1: 0.5}
    assert S.boundary_f1(truth, pred, 2, tolerance=2) == {0: 1.0, 1: 1.0}
    assert S.boundary_f1(truth, pred, 2) == {0: 0.375, 1: 0.5}  # default: 0.75 % of 14.1 px
    assert S.boundary_f1(truth, truth, 2, tolerance=0) == {0: 1.0, 1: 1.0}


def test_boundary_f1_of_a_square_shifted_by_three_pixels_with_tolerance_two():
    """Rows 2 and 5 of the rings: cols 2-5 vs 5-8; within 2 px: truth cols 3-5 and pred cols 5-7 (3 of 4
    each); the vertical sides (cols 2, 5 vs 5, 8; rows 3-4) match at col 5 only: truth col 5 <-> pred
    col 5, 2 pixels each. Square: P = R = (2*3 + 2) / 12."""
    truth, pred = _square(), _square(3)
    scores = S.boundary_f1(truth, pred, 2, tolerance=2)
    assert scores[1] == pytest.approx(8 / 12)


def test_boundary_f1_classes_absent_or_in_one_map_only():
    truth = np.zeros((8, 8), np.uint8)
    truth[:, 4:] = 1
    pred = truth.copy()
    pred[0:2, 0:2] = 2  # class 2 predicted, never true: BF 0; class 3 nowhere: skipped
    scores = S.boundary_f1(truth, pred, 4, tolerance=1)
    assert set(scores) == {0, 1, 2} and scores[2] == 0.0 and scores[1] == 1.0
    # class 0: true boundary col 3 (8 px); predicted: col 3 plus the block's rim (0,2) (1,2) (2,0) (2,1),
    # of which (0,2) and (1,2) are within 1 px of col 3: P = 10/12, R = 1, BF = 10/11
    assert scores[0] == pytest.approx(10 / 11)
    full = np.zeros((5, 5), np.uint8)
    assert S.boundary_f1(full, full, 2, tolerance=0) == {0: 1.0}  # one class filling both: no contour, BF 1


def test_ignored_pixels_are_never_boundary_pixels():
    """Truth: class 0 in cols 0-3, unlabelled cols 4-5, class 1 in cols 6-9. The prediction puts the
    class change inside the unlabelled band: over the labelled pixels neither map has a contour."""
    truth = np.zeros((10, 10), np.uint8)
    truth[:, 4:6] = 255
    truth[:, 6:] = 1
    pred = np.zeros((10, 10), np.uint8)
    pred[:, 5:] = 1
    assert S.boundary_f1(truth, pred, 2, tolerance=0) == {0: 1.0, 1: 1.0}
    labelled = truth.copy()
    labelled[:, 4:6] = 1  # labelled: the change is one column left of the prediction's
    assert S.boundary_f1(labelled, pred, 2, tolerance=0) == {0: 0.0, 1: 0.0}
    assert S.boundary_f1(labelled, pred, 2, tolerance=1) == {0: 1.0, 1: 1.0}


def test_near_boundary_matches_brute_force_distances():
    rng = np.random.RandomState(0)
    for _ in range(150):
        h, w = rng.randint(1, 24, size=2)
        boundary = rng.rand(h, w) < rng.rand() * 0.15
        tol = float(rng.choice([0.0, 0.5, 1.0, 1.5, math.sqrt(2), 2.0, 3.3, 7.0, 30.0]))
        ys, xs = np.nonzero(rng.rand(h, w) < 0.4)
        got = S.near_boundary(ys, xs, boundary, tol)
        by, bx = np.nonzero(boundary)
        d2 = (ys[:, None] - by[None, :]) ** 2 + (xs[:, None] - bx[None, :]) ** 2
        expected = (d2 <= tol * tol + 1e-9).any(axis=1) if by.size else np.zeros(ys.size, bool)
        assert np.array_equal(got, expected), (h, w, tol)


def test_default_tolerance_is_three_quarters_of_a_percent_of_the_diagonal():
    assert S.default_tolerance(2000, 2000) == pytest.approx(0.0075 * 2000 * math.sqrt(2))
    assert S.default_tolerance(3, 4) == pytest.approx(0.0375)


def test_segscore_accumulates_images_of_different_sizes():
    score = S.SegScore(["background", "square"], bf_tolerance=0.0)
    score.update([_square(1)], [_square()])
    big_t = np.zeros((6, 9), np.uint8)
    big_t[:, 5:] = 1
    big_t[0, 0] = 255
    score.update(np.stack([big_t]), np.stack([big_t]))  # (N, H, W) arrays work too; a perfect image
    r = score.result()
    assert r["primary"] == "miou" and r["n"] == 2 and r["ignored"] == 1 and r["pixels"] == 100 + 53
    # the square image: 84 background pixels (80 right), 16 square (12 right); the other: 29 + 24, all right
    assert r["confusion"] == [[80 + 29, 4], [4, 12 + 24]]
    assert r["global_accuracy"] == pytest.approx((80 + 29 + 12 + 24) / 153)
    assert r["miou"] == pytest.approx((109 / (113 + 113 - 109) + 36 / (40 + 40 - 36)) / 2)
    assert r["mean_bf"] == pytest.approx(((0.375 + 0.5) / 2 + 1.0) / 2)
    assert r["per_class"]["square"]["bf"] == pytest.approx((0.5 + 1.0) / 2)
    json.dumps(r, allow_nan=False)  # JSON-able: Python numbers only
    with pytest.raises(ValueError, match="2 predictions but 1 masks"):
        score.update([big_t, big_t], [big_t])


def test_segscore_images_with_nothing_labelled_have_no_bf():
    score = S.SegScore(["a", "b"])
    score.update([np.zeros((4, 4), np.uint8)], [np.full((4, 4), 255, np.uint8)])
    r = score.result()
    assert r["mean_bf"] is None and r["miou"] is None and r["ignored"] == 16 and r["n"] == 1
