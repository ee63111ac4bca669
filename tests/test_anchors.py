"""Anchors fitted to box sizes: k-means finds the clusters, beats badly scaled anchors on best
possible recall, the genetic refinement never lowers the fitness, a too-small set falls back to
the scaled COCO anchors with a warning."""
import numpy as np
import pytest

from rsedge.trainer.anchors import anchor_fitness, anchor_report, default_anchors, fit_anchors
from rsedge.trainer.det_models import DEFAULT_ANCHORS

CENTRES = np.array([[12.0, 10.0], [40.0, 80.0], [200.0, 150.0]])


def clustered(per_cluster=200, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([c * (1 + spread * rng.standard_normal((per_cluster, 2))) for c in CENTRES])


def test_three_clusters_give_anchors_at_their_centres():
    wh = clustered()
    one_each = fit_anchors(wh, n=3)
    assert one_each.shape == (3, 1, 2) and one_each.dtype == np.float32
    np.testing.assert_allclose(one_each[:, 0], CENTRES, rtol=0.03)  # sorted by area: level 0 the smallest
    nine = fit_anchors(wh)
    assert nine.shape == (3, 3, 2)
    flat = nine.reshape(-1, 2)
    assert np.all(np.diff(flat.prod(1)) >= 0)
    error = np.abs(flat[:, None, :] / CENTRES[None] - 1).max(2)  # (anchor, cluster) relative error
    assert np.all(error.min(1) < 0.2)  # every anchor sits on a cluster...
    assert np.all(error.min(0) < 0.03)  # ...and every cluster has an anchor right at its centre
    report = anchor_report(wh, nine)
    assert report["bpr"] == 1.0 and report["mean_best_ratio"] > 0.9 and report["boxes"] == len(wh)


def test_fitted_anchors_recall_at_least_as_well_as_badly_scaled_ones():
    rng = np.random.default_rng(3)
    wh = np.exp(rng.uniform(np.log(4), np.log(300), size=(500, 2)))
    fitted = fit_anchors(wh, input_size=320)
    bad = np.asarray(DEFAULT_ANCHORS) * 0.05
    good, poor = anchor_report(wh, fitted), anchor_report(wh, bad)
    assert good["bpr"] >= poor["bpr"] and good["bpr"] > 0.9 > poor["bpr"]
    assert good["mean_best_ratio"] > poor["mean_best_ratio"]
    assert anchor_report(np.zeros((0, 2)), fitted)["bpr"] == 0.0


def test_genetic_refinement_never_lowers_the_fitness():
    rng = np.random.default_rng(5)
    wh = np.concatenate([clustered(60, spread=0.3, seed=1), np.exp(rng.uniform(np.log(3), np.log(400), (100, 2)))])
    plain = fit_anchors(wh, seed=2)
    evolved = fit_anchors(wh, seed=2, generations=300)
    assert anchor_fitness(wh, evolved) >= anchor_fitness(wh, plain)
    assert not np.array_equal(evolved, plain)  # it did find improvements on this spread-out set
    assert np.all(evolved >= 2) and np.all(evolved <= 640)
    np.testing.assert_array_equal(evolved, fit_anchors(wh, seed=2, generations=300))  # seeded


def test_tiny_or_degenerate_sets_fall_back_to_scaled_coco_anchors():
    with pytest.warns(RuntimeWarning, match="only 5 distinct training box sizes"):
        anchors = fit_anchors(np.array([[10, 20], [30, 30], [40, 10], [50, 60], [70, 80], [1, 1]]), input_size=320)
    np.testing.assert_allclose(anchors, np.asarray(DEFAULT_ANCHORS) / 2)
    assert anchors.dtype == np.float32
    np.testing.assert_allclose(default_anchors((256, 320)), np.asarray(DEFAULT_ANCHORS) / 2)
    with pytest.warns(RuntimeWarning, match="only 1 distinct"):
        fit_anchors(np.tile([[16.0, 16.0]], (50, 1)))


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="multiple of 3"):
        fit_anchors(clustered(), n=8)
    with pytest.raises(ValueError, match=r"\(M, 2\) array"):
        fit_anchors(np.ones((10, 4)))
