"""Anchors fitted to the training boxes: k-means on the whitened box sizes, then an optional
genetic refinement that mutates the anchors and keeps a mutation only when the fitness improves.

Box sizes are (w, h) in input pixels (after the letterbox). The fitness of anchors on boxes is the
mean, over boxes, of the best anchor's ratio metric: for box b and anchor a, m = min over w and h
of min(b / a, a / b), counted only above 1 / ratio_threshold (the target assignment matches a box
to an anchor only within that ratio). The best possible recall (BPR) is the fraction of boxes some
anchor matches at all. numpy only (scipy is not a dependency).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

MIN_SIDE = 2.0
LEVELS = 3
KMEANS_RESTARTS = 5
KMEANS_ITERATIONS = 100
MUTATION_PROBABILITY, MUTATION_SIGMA = 0.9, 0.1


def _as_wh(wh) -> np.ndarray:
    wh = np.asarray(wh, dtype=np.float64)
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"box sizes must be an (M, 2) array of (w, h) pixels, got shape {wh.shape}")
    return wh


def _best_ratio(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Per box, the best anchor's ratio metric (1: an exact fit)."""
    r = wh[:, None, :] / anchors.reshape(-1, 2)[None, :, :]
    return np.minimum(r, 1 / r).min(axis=2).max(axis=1)


def anchor_fitness(wh, anchors, ratio_threshold: float = 4.0) -> float:
    """Mean best ratio metric over boxes, counting only the matches within the threshold."""
    best = _best_ratio(_as_wh(wh), np.asarray(anchors, dtype=np.float64))
    return float(np.mean(best * (best > 1 / ratio_threshold))) if len(best) else 0.0


def anchor_report(wh, anchors, ratio_threshold: float = 4.0) -> dict:
    """`bpr` (fraction of boxes some anchor matches within the ratio threshold), `mean_best_ratio`,
    `fitness` (as `fit_anchors` maximizes it) and the number of `boxes` scored."""
    wh = _as_wh(wh)
    if not len(wh):
        return {"bpr": 0.0, "mean_best_ratio": 0.0, "fitness": 0.0, "boxes": 0}
    best = _best_ratio(wh, np.asarray(anchors, dtype=np.float64))
    return {"bpr": float(np.mean(best > 1 / ratio_threshold)), "mean_best_ratio": float(best.mean()),
            "fitness": float(np.mean(best * (best > 1 / ratio_threshold))), "boxes": int(len(wh))}


def default_anchors(input_size: int | Sequence[int] = 640) -> np.ndarray:
    """The COCO anchors scaled from 640 to the longer side of `input_size`, (3, 3, 2) float32."""
    from .det_models import DEFAULT_ANCHORS

    side = input_size if isinstance(input_size, (int, float)) else max(input_size)
    return (np.asarray(DEFAULT_ANCHORS, dtype=np.float64) * (float(side) / 640)).astype(np.float32)


def _kmeans_once(points: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Lloyd's k-means from a k-means++ start; returns (centres, mean distance to the nearest)."""
    centres = points[rng.integers(len(points))][None]
    while len(centres) < k:
        d2 = ((points[:, None, :] - centres[None]) ** 2).sum(2).min(1)
        p = d2 / d2.sum() if d2.sum() > 0 else None
        centres = np.vstack([centres, points[rng.choice(len(points), p=p)]])
    for _ in range(KMEANS_ITERATIONS):
        label = ((points[:, None, :] - centres[None]) ** 2).sum(2).argmin(1)
        moved = np.array([points[label == j].mean(0) if np.any(label == j) else centres[j] for j in range(k)])
        if np.allclose(moved, centres):
            break
        centres = moved
    dist = np.sqrt(((points[:, None, :] - centres[None]) ** 2).sum(2).min(1)).mean()
    return centres, float(dist)


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    runs = [_kmeans_once(points, k, rng) for _ in range(KMEANS_RESTARTS)]
    return min(runs, key=lambda run: run[1])[0]


def _evolve(wh: np.ndarray, anchors: np.ndarray, generations: int, ratio_threshold: float,
            upper: float, rng: np.random.Generator, progress: bool) -> np.ndarray:
    """Mutate every anchor side with probability 0.9 by a factor 1 + N(0, 0.1 * u), u uniform per
    generation (clipped to 0.3 .. 3), keeping the mutation only when the fitness rises."""
    best_fit = anchor_fitness(wh, anchors, ratio_threshold)
    steps = range(generations)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="anchor evolution", leave=False)
    for _ in steps:
        factor = np.ones_like(anchors)
        while np.all(factor == 1):
            mask = rng.random(anchors.shape) < MUTATION_PROBABILITY
            factor = (mask * rng.random() * rng.standard_normal(anchors.shape) * MUTATION_SIGMA + 1).clip(0.3, 3.0)
        candidate = (anchors * factor).clip(MIN_SIDE, upper)
        fit = anchor_fitness(wh, candidate, ratio_threshold)
        if fit > best_fit:
            anchors, best_fit = candidate, fit
            if progress:
                steps.set_postfix(fitness=f"{best_fit:.4f}")
    return anchors


def fit_anchors(wh, n: int = 9, input_size: int | Sequence[int] = 640, ratio_threshold: float = 4.0,
                generations: int = 0, seed: int = 0, progress: bool = False) -> np.ndarray:
    """Anchors (3, n / 3, 2) float32 in input pixels, sorted by area (smallest to level 0), from
    the training boxes' sizes `wh` (M, 2) in input pixels. Boxes with a side under 2 px are
    dropped. Fallback: with fewer distinct usable boxes than `n`, k-means has nothing to fit, so the
    COCO anchors scaled to `input_size` (`default_anchors`) are returned with a RuntimeWarning.
    `generations` > 0 adds the genetic refinement (never lowers the fitness); anchors stay within
    2 px .. the longer input side."""
    if n < LEVELS or n % LEVELS:
        raise ValueError(f"n must be a positive multiple of {LEVELS} (anchors per level x {LEVELS} levels), got {n}")
    wh = _as_wh(wh)
    wh = wh[np.all(wh >= MIN_SIDE, axis=1) & np.all(np.isfinite(wh), axis=1)]
    if len(np.unique(wh, axis=0)) < n:
        warnings.warn(f"anchors: only {len(np.unique(wh, axis=0))} distinct training box sizes of at least "
                      f"{MIN_SIDE:g} px for {n} anchors; using the default COCO anchors scaled to the input size",
                      RuntimeWarning, stacklevel=2)
        return default_anchors(input_size)
    kmeans_rng, evolve_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    scale = wh.std(axis=0)
    scale[scale == 0] = 1.0
    anchors = _kmeans(wh / scale, n, kmeans_rng) * scale
    upper = float(input_size if isinstance(input_size, (int, float)) else max(input_size))
    anchors = anchors.clip(MIN_SIDE, upper)
    if generations > 0:
        anchors = _evolve(wh, anchors, generations, ratio_threshold, upper, evolve_rng, progress)
    anchors = anchors[np.argsort(anchors.prod(axis=1))]
    return anchors.reshape(LEVELS, n // LEVELS, 2).astype(np.float32)
