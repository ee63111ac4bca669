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
    items = [(str(rel), item_target(label)) for rel, label in items]
    if fraction == 1:
        return items
    by_class: dict[Any, list[tuple[str, Any]]] = defaultdict(list)
    for it in sorted(items):
        by_class[it[1] if isinstance(it[1], int) else None].append(it)
    rng = random.Random(seed)
    chosen = set()
    for label in sorted(by_class):
        group = by_class[label]
        rng.shuffle(group)
        chosen.update(rel for rel, _ in group[: max(1, round(fraction * len(group)))])
    return [it for it in items if it[0] in chosen]


def item_target(label: Any) -> Any:
    """A class index as an int; another target (a mask file of a segmentation pair) as a string,
    a detection image's box list as it is: such items form one stratum."""
    if isinstance(label, (list, tuple)):  # a detection image's boxes
        return label
    return int(label) if isinstance(label, (int, float)) or str(label).isdigit() else str(label)


def fraction_info(fraction: float, seed: int, used: Sequence[Sequence[Any]], total: Sequence[Sequence[Any]],
                  classes: Sequence[str] | None = None) -> dict[str, Any]:
    """What the record says about a fraction: how many images of how many, per class."""
    info: dict[str, Any] = {"fraction": fraction, "seed": seed, "images": len(used), "of": len(total)}
    if all(isinstance(item_target(label), int) for _, label in used):
        per_class = Counter(int(label) for _, label in used)
        name = (lambda i: classes[i]) if classes else str
        info["per_class"] = {name(i): per_class[i] for i in sorted(per_class)}
    return info


def fraction_of_split(split: dict[str, Any], fraction: float, seed: int, classes: Sequence[str] | None = None,
                      log=None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`split` with its training part thinned to a stratified fraction, before any dataset is made
    of it (a segmentation dataset cuts its tiles into windows when it is made), and the record
    entry (None when F is 1: nothing was left out)."""
    if check_fraction(fraction) == 1:
        return split, None
    used = stratified_fraction(split["train"], fraction, seed)
    info = fraction_info(fraction, seed, used, split["train"], classes)
    if log is not None:
        log(f"--fraction {fraction:g}: {info['images']} of {info['of']} training images (seed {seed})")
    return {**split, "train": used}, info
