"""Coreset selection (seed 003): the training part of a classification split cut to a fraction
of each class, chosen at random or by what a short proxy training run says about each image.

- random: a seeded draw, stratified per class.
- forgetting (Toneva et al. 2018, "An empirical study of example forgetting during deep neural
  network learning"): every time the proxy is shown an image during training, whether it
  classified it correctly is recorded (the forward pass of the step that presents it, before the
  update); a forgetting event is correct -> incorrect between two consecutive presentations, and
  an image never classified correctly counts as forgotten infinitely often. The images with the
  most events are kept: they carry the decision boundary, the unforgettable ones are redundant.
- margin (Settles 2009, "Active learning literature survey", margin sampling): after the proxy
  is trained, p_top1 - p_top2 of its softmax on every training image (evaluation transform);
  the lowest margins, the images nearest the boundary, are kept.

Each class keeps max(1, round(fraction * n_c)) of its n_c training images (the rounding of
`--fraction`), ties broken by a seeded random order. The result is an ordinary rsedge split
(`split.json`: validation and test unchanged, train = the coreset, plus a "coreset" entry) that
`rsedge train --split` reads, so every later stage sees the same images.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .records import write_record
from .sampling import check_fraction

METHODS = ("random", "forgetting", "margin")
MAX_PROXY_SIZE = 64  # the proxy only ranks images: a small input keeps it a minutes-long run
Log = Callable[[str], None]


@dataclass
class CoresetOptions:
    """`rsedge coreset`: how the coreset is chosen, and how the proxy that scores images trains
    (AdamW at `lr`, cosine schedule, the training augmentations of `rsedge train`)."""

    method: str = "random"
    fraction: float = 0.1
    proxy_model: str = "resnet18"
    proxy_epochs: int = 3
    img_size: int | None = None  # proxy input side; None: the data's, capped to MAX_PROXY_SIZE
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0  # the selection's tie-break and random draw, the proxy's initialization and data order
    workers: int = 1
    device: str = "auto"
    split_file: str | Path | None = None  # select from this split's training part (else a new split)
    val: float = 0.1  # of a new split
    test: float = 0.2
    exist_ok: bool = False
    progress: bool = True

    def check(self) -> CoresetOptions:
        """One-line errors before any image is read."""
        from .models import get_spec

        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        check_fraction(self.fraction)
        if self.method != "random":
            if get_spec(self.proxy_model).task != "classification":
                raise ValueError(f"--proxy-model must be a classifier; {self.proxy_model} is a "
                                 f"{get_spec(self.proxy_model).task} model")
            least = 2 if self.method == "forgetting" else 1
            if self.proxy_epochs < least:
                raise ValueError(f"--proxy-epochs must be at least {least} for {self.method} "
                                 "(a forgetting event needs two presentations of an image)")
        if self.img_size is not None and self.img_size < 8:
            raise ValueError(f"--img-size must be at least 8, not {self.img_size}")
        return self


# -- the pure parts: scores and selection ---------------------------------------------------------

def forgetting_counts(correct: np.ndarray, presented: np.ndarray | None = None) -> np.ndarray:
    """Forgetting events per sample from a (samples x presentations) boolean matrix of whether the
    sample was classified correctly at each presentation, in order. `presented` (same shape)
    marks the presentations that happened (an image skipped in an epoch, e.g. unreadable or the
    lone last sample, has none that epoch): only those count, consecutive among themselves.
    Returns floats: the count; inf for a sample never classified correctly (Toneva et al.: never
    learned ranks as most forgotten); nan for a sample never presented (no evidence at all)."""
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2:
        raise ValueError(f"correct must be a (samples x presentations) matrix, not shape {correct.shape}")
    seen = np.ones_like(correct) if presented is None else np.asarray(presented, dtype=bool)
    if seen.shape != correct.shape:
        raise ValueError(f"presented has shape {seen.shape}, correct {correct.shape}")
    out = np.empty(len(correct), dtype=np.float64)
    for i, (row, mask) in enumerate(zip(correct, seen)):
        acc = row[mask]
        if acc.size == 0:
            out[i] = np.nan
        elif not acc.any():
            out[i] = np.inf
        else:
            out[i] = np.count_nonzero(acc[:-1] & ~acc[1:])
    return out


def prediction_margins(probs: np.ndarray) -> np.ndarray:
    """Settles' margin p_top1 - p_top2 per row of class probabilities: small means the model
    hesitates between two classes, whatever the true label."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must be (samples x classes) with at least 2 classes, not shape {probs.shape}")
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def per_class_quota(n: int, fraction: float) -> int:
    """Images a class of `n` keeps: round(fraction * n) as `--fraction` rounds it, at least one."""
    return min(n, max(1, round(check_fraction(fraction) * n)))


def select_per_class(labels: Sequence[int], scores: Sequence[float] | None, fraction: float, seed: int,
                     highest: bool = True) -> np.ndarray:
    """Indices (ascending) of the samples kept: in every class its quota of the best-ranked,
    best = highest (or lowest) score, ties in a seeded random order; a nan score (no evidence)
    ranks last. `scores` None: a seeded random draw per class (the random coreset)."""
    labels = np.asarray(labels, dtype=np.int64)
    key = np.zeros(len(labels)) if scores is None else np.asarray(scores, dtype=np.float64)
    if key.shape != labels.shape:
        raise ValueError(f"{len(key)} scores for {len(labels)} samples")
    key = -key if highest else key.copy()
    key[np.isnan(key)] = np.inf
    tiebreak = np.random.default_rng(seed).permutation(len(labels))
    order = np.lexsort((tiebreak, key))  # by key, then by the random tie-break
    chosen = []
    for c in np.unique(labels):
        members = order[labels[order] == c]
        chosen.extend(members[:per_class_quota(len(members), fraction)].tolist())
    return np.sort(np.asarray(chosen, dtype=np.int64))


def class_counts(items: Sequence[Sequence[Any]], classes: Sequence[str]) -> dict[str, int]:
    counts = Counter(int(label) for _, label in items)
    return {name: counts[i] for i, name in enumerate(classes)}


# -- the proxy run ----------------------------------------------------------------------------------

class IndexedDataset:
    """Yields (image, label, index), so a shuffled batch says which samples it presented."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


def data_side(root: Path, items: Sequence[Sequence[Any]]) -> int:
    """The shorter side of the first readable training image, capped to MAX_PROXY_SIZE."""
    from .datasets import open_rgb

    for rel, _ in items[:20]:
        try:
            return min(min(open_rgb(root / rel).size), MAX_PROXY_SIZE)
        except Exception:  # noqa: BLE001 - an unreadable image says nothing about the size; try the next
            continue
    return MAX_PROXY_SIZE


def _batches(loader, progress: bool, desc: str):
    if not progress:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, unit="batch", leave=False)


def train_proxy(root: Path, items: Sequence[Sequence[Any]], num_classes: int, o: CoresetOptions, size: int,
                log: Log) -> tuple[Any, np.ndarray, np.ndarray]:
    """Train the proxy from scratch for `o.proxy_epochs` epochs; returns (model in eval mode,
    correct, presented): per sample and epoch, whether its presentation was classified correctly
    and whether it was presented (batches of one are skipped: BatchNorm cannot train on them)."""
    import torch
    import torch.nn.functional as F

    from .datasets import ImageListDataset
    from .models import create_model, get_spec
    from .train import TrainConfig, lr_at, make_loader, make_optimizer, pick_device, seed_everything, warn_skipped
    from .transforms import train_transform

    device = pick_device(o.device)
    seed_everything(o.seed)
    model = create_model(o.proxy_model, num_classes).to(device).train()
    norm = get_spec(o.proxy_model).normalization
    dataset = IndexedDataset(ImageListDataset(root, items, train_transform((size, size), **norm)))
    cfg = TrainConfig(epochs=o.proxy_epochs, batch_size=o.batch_size, optimizer="adamw", lr=o.lr,
                      seed=o.seed).resolved()
    optimizer = make_optimizer(model, cfg)
    correct = np.zeros((len(items), o.proxy_epochs), dtype=bool)
    presented = np.zeros_like(correct)
    for epoch in range(o.proxy_epochs):
        loader = make_loader(dataset, o.batch_size, True, o.seed, epoch, o.workers, min_batch=2,
                             report=lambda skipped: warn_skipped(skipped, log))
        for step, (x, y, index) in enumerate(_batches(loader, o.progress, f"proxy epoch {epoch + 1}")):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, epoch, step / max(len(loader), 1))
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                correct[index.numpy(), epoch] = (logits.argmax(1) == y).cpu().numpy()
            presented[index.numpy(), epoch] = True
        seen = presented[:, epoch]
        log(f"proxy epoch {epoch + 1}/{o.proxy_epochs}: {correct[seen, epoch].mean() if seen.any() else 0:.1%} "
            f"of the presented images classified correctly")
    return model.eval(), correct, presented


def proxy_margins(model, root: Path, items: Sequence[Sequence[Any]], o: CoresetOptions, size: int,
                  log: Log) -> np.ndarray:
    """p_top1 - p_top2 of the trained proxy on every training image (evaluation transform: the
    image as it is, not an augmented view); nan for an image that became unreadable."""
    import torch

    from .datasets import ImageListDataset
    from .models import get_spec
    from .train import make_loader, warn_skipped
    from .transforms import eval_transform

    device = next(model.parameters()).device
    norm = get_spec(o.proxy_model).normalization
    dataset = IndexedDataset(ImageListDataset(root, items, eval_transform((size, size), **norm)))
    loader = make_loader(dataset, o.batch_size, False, 0, 0, o.workers, report=lambda s: warn_skipped(s, log))
    out = np.full(len(items), np.nan)
    with torch.no_grad():
        for x, _, index in _batches(loader, o.progress, "margins"):
            probs = torch.softmax(model(x.to(device)).float(), dim=1).cpu().numpy()
            out[index.numpy()] = prediction_margins(probs)
    return out


# -- the stage --------------------------------------------------------------------------------------

def coreset_scores(split: dict[str, Any], o: CoresetOptions, log: Log) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Scores of the training images for `o.method` (None for random) and what the record says
    of the proxy run (None fields for random: no proxy)."""
    items = split["train"]
    if o.method == "random":
        return None, {"model": None, "epochs": None, "img_size": None}
    root = Path(split["root"])
    size = o.img_size or data_side(root, items)
    log(f"proxy: {o.proxy_model} at {size}x{size}, {o.proxy_epochs} epoch(s) on {len(items)} training images")
    model, correct, presented = train_proxy(root, items, len(split["classes"]), o, size, log)
    proxy = {"model": o.proxy_model, "epochs": o.proxy_epochs, "img_size": size, "lr": o.lr,
             "batch_size": o.batch_size, "last_epoch_correct": float(correct[presented[:, -1], -1].mean())
             if presented[:, -1].any() else None}
    if o.method == "forgetting":
        scores = forgetting_counts(correct, presented)
        finite = scores[np.isfinite(scores)]
        proxy["forgetting_events"] = {**{str(int(k)): int(v) for k, v in zip(*np.unique(finite, return_counts=True))},
                                      "never_learned": int(np.isinf(scores).sum()),
                                      "never_presented": int(np.isnan(scores).sum())}
    else:
        scores = proxy_margins(model, root, items, o, size, log)
        proxy["margin_mean"] = float(np.nanmean(scores)) if np.isfinite(scores).any() else None
    return scores, proxy


def coreset_split(split: dict[str, Any], o: CoresetOptions, log: Log = print) -> tuple[dict[str, Any], dict]:
    """`split` with its training part cut to the coreset `o` selects (validation and test
    unchanged), and the proxy's summary for the record."""
    o.check()
    items = split["train"]
    if not items or not all(isinstance(label, int) for _, label in items):
        raise ValueError("coreset selection needs a classification split with training images "
                         "(class-index labels)")
    scores, proxy = coreset_scores(split, o, log)
    keep = select_per_class([label for _, label in items], scores, o.fraction, o.seed,
                            highest=o.method != "margin")
    train = [list(items[i]) for i in keep]
    info = {"method": o.method, "fraction": o.fraction, "seed": o.seed, "proxy_model": proxy["model"],
            "proxy_epochs": proxy["epochs"], "proxy_img_size": proxy["img_size"], "images": len(train),
            "of": len(items), "per_class": class_counts(train, split["classes"]),
            "per_class_before": class_counts(items, split["classes"]),
            **({"previous": split["coreset"]} if split.get("coreset") else {})}  # a coreset of a coreset
    new = {**split, "train": train, "counts": {**split["counts"], "train": len(train)}, "coreset": info}
    return new, proxy


def source_split(data: str | Path, o: CoresetOptions) -> dict[str, Any] | None:
    """The split named by `o.split_file` (which must exist and be of `data`), else None."""
    if o.split_file is None:
        return None
    from .datasets import load_split, resolve_split

    if not Path(o.split_file).is_file():
        raise FileNotFoundError(f"split file not found: {o.split_file}")
    load_split(o.split_file)  # refuses a file that is no split before the folder is scanned
    return resolve_split(data, None, o.split_file, progress=o.progress)


def coreset_run(data: str | Path, out: str | Path, options: CoresetOptions | None = None,
                log: Log = print) -> dict[str, Any]:
    """Select the coreset of `data`'s training images (of `options.split_file`, or of a new
    split) and write `out/split.json` and `out/record.json`; returns the record."""
    from .datasets import make_split, save_split
    from .stage import RunDirKind, open_run_dir

    o = (options or CoresetOptions()).check()
    start = time.perf_counter()
    split = source_split(data, o)  # read before the run directory is opened: it may live there
    out = open_run_dir(out, exist_ok=o.exist_ok, log=log,
                       kind=RunDirKind("a coreset", ("record.json", "split.json"), resumable=False))
    if split is None:
        split = make_split(data, val=o.val, test=o.test, seed=o.seed, progress=o.progress)
        if split["skipped"]:
            log(f"warning: {len(split['skipped'])} unreadable image(s) left out; listed in {out / 'split.json'}")
    new, proxy = coreset_split(split, o, log)
    save_split(new, out / "split.json")
    info = new["coreset"]
    log(f"coreset ({o.method}, fraction {o.fraction:g}): {info['images']} of {info['of']} training images "
        f"kept; val {new['counts']['val']} and test {new['counts']['test']} unchanged")
    return _record(out, o, new, proxy, time.perf_counter() - start)


def _record(out: Path, o: CoresetOptions, split: dict[str, Any], proxy: dict[str, Any],
            seconds: float) -> dict[str, Any]:
    from .records import read_json

    info = split["coreset"]
    write_record(out, "coreset", {
        "inputs": {"data": split["root"], "split_file": str(Path(o.split_file).resolve()) if o.split_file else None},
        "method": o.method, "fraction": o.fraction, "seed": o.seed,
        "proxy": proxy,
        "images": {"before": info["of"], "after": info["images"]},
        "per_class": {"before": info["per_class_before"], "after": info["per_class"]},
        "split": {"file": "split.json", "counts": split["counts"]},
        "seconds": round(seconds, 3),
        "outputs": {"split": "split.json"},
    })
    return read_json(out / "record.json")
