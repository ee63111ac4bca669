"""Image-folder classification datasets (EuroSAT, UC Merced, AID, NWPU-RESISC45 layout).

A split is decided once, written to the run directory as `split.json`, and reused by every later
stage, so pruning, fine-tuning, export and evaluation all see exactly the same images. Images that
cannot be decoded are found when the split is made, listed in it, and never reach a DataLoader.
"""
from __future__ import annotations

import hashlib
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from .records import atomic_write_json, read_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
SPLIT_FORMAT = "rsedge-split/1"


class DatasetError(ValueError):
    """A dataset problem the user must fix (empty class folder, mismatched classes...)."""


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes are the sub-folders of `root`, sorted; samples are (path relative to root, label)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders (expected ROOT/<class>/<image>)")
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        files = sorted(
            f for f in (root / name).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            empty.append(name)
        samples.extend((f.relative_to(root).as_posix(), label) for f in files)
    if empty:
        raise DatasetError(f"class folder(s) with no images in {root}: {', '.join(empty)}")
    return classes, samples


def _decode_error(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
        return None
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
        return f"{type(e).__name__}: {e}"


def find_corrupt(root: Path, samples: Sequence[tuple[str, int]], progress: bool = True) -> dict[str, str]:
    """Decode every image once (threads: PIL releases the GIL while decoding)."""
    paths = [root / rel for rel, _ in samples]
    it = ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)).map(_decode_error, paths, chunksize=64)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(paths), desc="checking images", unit="img", leave=False)
    return {rel: err for (rel, _), err in zip(samples, it) if err is not None}


def stratified_split(
    samples: Sequence[tuple[str, int]], val: float, test: float, seed: int
) -> dict[str, list[tuple[str, int]]]:
    """Per-class shuffle with `seed`, then val and test fractions of each class (at least one
    image each when the class has three or more), the rest for training."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DatasetError(f"bad split fractions: val={val} test={test}")
    by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for s in samples:
        by_class[s[1]].append(s)
    rng = random.Random(seed)
    out: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n = len(items)
        n_val = round(n * val)
        n_test = round(n * test)
        if n >= 3:
            n_val = max(n_val, 1 if val > 0 else 0)
            n_test = max(n_test, 1 if test > 0 else 0)
        out["val"].extend(items[:n_val])
        out["test"].extend(items[n_val : n_val + n_test])
        out["train"].extend(items[n_val + n_test :])
    return out


def make_split(
    data_dir: str | os.PathLike,
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    check_images: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    root = Path(data_dir).resolve()
    classes, samples = scan_image_folder(root)
    corrupt = find_corrupt(root, samples, progress) if check_images else {}
    good = [s for s in samples if s[0] not in corrupt]
    counts = defaultdict(int)
    for _, label in good:
        counts[label] += 1
    unusable = [classes[i] for i in range(len(classes)) if counts[i] == 0]
    if unusable:
        raise DatasetError(f"class folder(s) with no readable images in {root}: {', '.join(unusable)}")
    parts = stratified_split(good, val, test, seed)
    return {
        "format": SPLIT_FORMAT,
        "root": str(root),
        "classes": classes,
        "seed": seed,
        "fractions": {"val": val, "test": test},
        "counts": {k: len(v) for k, v in parts.items()},
        "skipped": [{"path": rel, "error": err} for rel, err in sorted(corrupt.items())],
        **{k: [[rel, label] for rel, label in v] for k, v in parts.items()},
    }


def split_digest(split: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for part in ("train", "val", "test"):
        for rel, label in split[part]:
            h.update(f"{part}\0{rel}\0{label}\n".encode())
    return h.hexdigest()


def save_split(split: dict[str, Any], path: str | os.PathLike) -> None:
    atomic_write_json(path, split)


def load_split(path: str | os.PathLike) -> dict[str, Any]:
    split = read_json(path)
    if split.get("format") != SPLIT_FORMAT:
        raise DatasetError(f"{path} is not an rsedge split file")
    return split


def check_classes(expected: Sequence[str], found: Sequence[str], what: str = "dataset") -> None:
    """Two stages must agree on the class list, in order: labels are indices."""
    if list(expected) == list(found):
        return
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    detail = []
    if missing:
        detail.append(f"missing from the {what}: {', '.join(missing)}")
    if extra:
        detail.append(f"not known to the model: {', '.join(extra)}")
    if not detail:
        detail.append(f"same names in another order: model {list(expected)} vs {what} {list(found)}")
    raise DatasetError("class sets differ between stages; " + "; ".join(detail))


def resolve_split(
    data_dir: str | os.PathLike,
    run_dir: str | os.PathLike | None,
    split_file: str | os.PathLike | None = None,
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The split an earlier stage wrote when it applies to this data folder, otherwise a new one
    (written to `run_dir/split.json`, where later stages will find it)."""
    root = Path(data_dir).resolve()
    candidates = [split_file] if split_file else []
    if run_dir is not None:
        candidates.append(Path(run_dir) / "split.json")
    for cand in candidates:
        if cand and Path(cand).is_file():
            split = load_split(cand)
            if Path(split["root"]) == root:
                classes_now, samples = scan_image_folder(root)
                check_classes(split["classes"], classes_now, what=f"folder {root}")
                present = {rel for rel, _ in samples}
                lost = [rel for part in ("train", "val", "test") for rel, _ in split[part] if rel not in present]
                if lost:
                    raise DatasetError(
                        f"{len(lost)} image(s) of split {cand} are gone from {root}, e.g. {lost[0]}"
                    )
                if run_dir is not None and Path(cand) != Path(run_dir) / "split.json":
                    save_split(split, Path(run_dir) / "split.json")
                return split
            if split_file and Path(cand) == Path(split_file):
                raise DatasetError(f"split {cand} was made for {split['root']}, not {root}")
    split = make_split(root, val=val, test=test, seed=seed, progress=progress)
    if run_dir is not None:
        save_split(split, Path(run_dir) / "split.json")
    return split


class ImageListDataset:
    """A torch-compatible dataset over (relative path, label) pairs under one root."""

    def __init__(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], transform: Callable | None = None):
        self.root = Path(root)
        self.items = [(str(rel), int(label)) for rel, label in items]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def targets(self) -> list[int]:
        return [label for _, label in self.items]

    def __getitem__(self, index: int):
        from PIL import Image

        rel, label = self.items[index]
        path = self.root / rel
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:
            raise DatasetError(f"cannot read {path} (it was readable when the split was made): {e}") from e
        if self.transform is not None:
            img = self.transform(img)
        return img, label
