"""`--fraction F`: a seeded, per-class stratified subset of the images a command reads, as
Ultralytics' `fraction=`. The split file always keeps the full split, so a quick run on a
fraction never changes what a later stage trains or tests on."""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any


def check_fraction(fraction: float) -> float:
    fraction = float(fraction)
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], not {fraction}")
    return fraction


def stratified_fraction(items: Sequence[Sequence[Any]], fraction: float, seed: int = 0) -> list[tuple[str, int]]:
    """round(F * n_c) images of every class c (at least one, so no class disappears), drawn with
    `seed`; the result keeps the order of `items`."""
    fraction = check_fraction(fraction)
    items = [(str(rel), int(label)) for rel, label in items]
    if fraction == 1:
        return items
    by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for it in sorted(items):
        by_class[it[1]].append(it)
    rng = random.Random(seed)
    chosen = set()
    for label in sorted(by_class):
        group = by_class[label]
        rng.shuffle(group)
        chosen.update(group[: max(1, round(fraction * len(group)))])
    return [it for it in items if it in chosen]


def fraction_info(fraction: float, seed: int, used: Sequence[Sequence[Any]], total: Sequence[Sequence[Any]],
                  classes: Sequence[str] | None = None) -> dict[str, Any]:
    """What the record says about a fraction: how many images of how many, per class."""
    per_class = Counter(int(label) for _, label in used)
    name = (lambda i: classes[i]) if classes else str
    return {"fraction": fraction, "seed": seed, "images": len(used), "of": len(total),
            "per_class": {name(i): per_class[i] for i in sorted(per_class)}}


def subsample_dataset(ds, fraction: float, seed: int, classes: Sequence[str] | None = None,
                      log=None) -> tuple[Any, dict[str, Any] | None]:
    """Shrink an `ImageListDataset` in place to a stratified fraction; returns it and the record
    entry (None when F is 1: nothing was left out)."""
    if check_fraction(fraction) == 1:
        return ds, None
    total = list(ds.items)
    ds.items = stratified_fraction(total, fraction, seed)
    info = fraction_info(fraction, seed, ds.items, total, classes)
    if log is not None:
        log(f"--fraction {fraction:g}: {info['images']} of {info['of']} images, stratified by class (seed {seed})")
    return ds, info
