"""Image-folder classification datasets (EuroSAT, UC Merced, AID, NWPU-RESISC45 layout).

A split is decided once, written to the run directory as `split.json`, and reused by every later
stage, so pruning, fine-tuning, export and evaluation all see exactly the same images. Images that
cannot be decoded are found when the split is made, listed in it, and never reach a DataLoader;
one that becomes unreadable later is skipped by the loaders and counted (`SkipUnreadable`).
"""
from __future__ import annotations

import hashlib
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rsedge.runtime.imagefolder import IMAGE_EXTENSIONS, is_image_name, scan_class_folders

from .records import atomic_write_json, read_json

SPLIT_FORMAT = "rsedge-split/1"
SEGMENTATION_HINT = "deeplabv3plus_resnet18 (see `rsedge models`)"


class DatasetError(ValueError):
    """A dataset problem the user must fix (empty class folder, mismatched classes...)."""


class UnreadableImage(DatasetError):
    """An image of the split that can no longer be decoded (deleted, truncated, overwritten after
    the split was made). Loaders skip it and count it (`SkipUnreadable`); direct indexing raises."""

    def __init__(self, path: str, error: str):
        super().__init__(f"cannot read {path} (it was readable when the split was made): {error}")
        self.path, self.error = path, error

    def __reduce__(self):
        return type(self), (self.path, self.error)


def _has(folder: Path, suffixes: Sequence[str]) -> bool:
    """Whether `folder` holds (at any depth) a file with one of `suffixes`; stops at the first."""
    return folder.is_dir() and any(f.suffix.lower() in suffixes for f in folder.rglob("*"))


def _coco_json(root: Path) -> Path | None:
    for folder in (root, root / "annotations"):
        for f in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            with open(f, "rb") as fh:
                head = fh.read(1 << 20)
            if b'"images"' in head and (b'"annotations"' in head or b'"categories"' in head):
                return f
    return None


def _layout_of(root: Path) -> tuple[str, str] | None:
    """(task, layout) when `root` is a detection or segmentation dataset in a published layout."""
    sub = {p.name: p for p in root.iterdir() if p.is_dir()}
    if "positive image set" in sub or ("ground truth" in sub and _has(sub["ground truth"], (".txt",))):
        return "detection", "NWPU VHR-10 layout: 'positive image set/' and 'ground truth/*.txt'"
    if "images" in sub and "labels" in sub:
        if _has(sub["labels"], (".txt",)):
            return "detection", "YOLO layout: images/ and labels/*.txt"
        if _has(sub["labels"], IMAGE_EXTENSIONS):
            return "segmentation", "images/ and label masks in labels/"
    if "Annotations" in sub and _has(sub["Annotations"], (".xml",)):
        return "detection", "Pascal VOC layout: JPEGImages/ and Annotations/*.xml"
    if "SegmentationClass" in sub:
        return "segmentation", "Pascal VOC layout: JPEGImages/ and SegmentationClass/"
    if "images" in sub and "masks" in sub:
        return "segmentation", "images/ and masks/"
    if (root / "class_dict.csv").is_file():
        return "segmentation", "class_dict.csv of mask colours, the CamVid / DeepGlobe convention"
    tiles = [n for n, p in sub.items() if (p / "images").is_dir() and (p / "masks").is_dir()]
    if tiles:
        return "segmentation", f"tiles of images/ and masks/: {', '.join(sorted(tiles)[:3])}..."
    coco = _coco_json(root)
    if coco is not None:
        return "detection or instance segmentation", f"COCO layout: {coco.relative_to(root)}"
    return None


def _task_hint(task: str, layout: str) -> str:
    if task == "segmentation":
        return f"a segmentation model reads it: --model {SEGMENTATION_HINT}"
    if layout.startswith("Pascal VOC"):
        return "rsedge reads detection boxes as NWPU VHR-10, YOLO txt or COCO json, not VOC XML yet: convert them"
    if task.startswith("detection"):
        return "a detection model reads it: --model yolo_n (or yolo_s)"
    return f"a {task} command would read it, and rsedge has none yet"


def check_classification_layout(root: Path) -> None:
    """A detection or segmentation dataset read as classes would be a silent nonsense task
    ("masks" and "images" as two classes) or a confusing error; say what the folder is. A folder
    of loose images (`positive image set/`) is judged by its parent."""
    places = [root]
    if any(f.is_file() and is_image_name(f.name) for f in root.iterdir()):
        places.append(root.parent)
    for where in places:
        found = _layout_of(where)
        if found:
            task, layout = found
            what = str(root) if where == root else f"{root} is part of {where}, which"
            hint = _task_hint(task, layout)
            raise DatasetError(f"rsedge's classification commands read ROOT/<class>/<image>; {what} looks like "
                               f"a {task} dataset ({layout}): {hint}")


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes are the sub-folders of `root`, sorted; samples are (path relative to root, label).
    The runtime's `scan_class_folders` lists them, so `rsedge-bench --eval` sees the same files
    (images at any depth, hidden names skipped, extensions in any case)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    check_classification_layout(root)
    scanned = scan_class_folders(str(root))
    classes = [name for name, _ in scanned]
    if not classes:
        loose = sum(1 for f in root.iterdir() if f.is_file() and is_image_name(f.name))
        held = f" holds {loose} images but" if loose else ""
        raise DatasetError(f"{root}{held} has no class sub-folders (expected ROOT/<class>/<image>)")
    samples = [(rel, label) for label, (_, files) in enumerate(scanned) for rel in files]
    empty = [name for name, files in scanned if not files]
    if empty:
        raise DatasetError(f"class folder(s) with no images in {root}: {', '.join(empty)}")
    if len(classes) == 1 and not any(f.is_file() for f in (root / classes[0]).iterdir()):
        raise DatasetError(f"{root} has a single class folder, {classes[0]}, whose images are in sub-folders: "
                           f"is {root / classes[0]} the dataset root (ROOT/<class>/<image>)?")
    return classes, samples


def open_rgb(path: Path):
    """A decoded PIL RGB image of any file the folder scan lists; .npy arrays (which a numpy-only
    device also reads) go through the runtime's reader."""
    from PIL import Image

    if Path(path).suffix.lower() == ".npy":
        from rsedge.runtime.preprocess import load_image

        return Image.fromarray(load_image(str(path)))
    with Image.open(path) as im:
        return im.convert("RGB")


def _decode_error(path: Path) -> str | None:
    try:
        open_rgb(path).load()
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
    fraction: float = 1.0,
) -> dict[str, Any]:
    """`fraction` < 1 splits (and decodes) a stratified sample only: a quick look at a large
    folder (`rsedge data check --fraction`), never a split for training."""
    from .sampling import stratified_fraction

    root = Path(data_dir).resolve()
    classes, samples = scan_image_folder(root)
    scanned = len(samples)
    samples = stratified_fraction(samples, fraction, seed)
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
        **({"sample": {"fraction": fraction, "images": len(samples), "of": scanned}} if fraction < 1 else {}),
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


@dataclass(frozen=True)
class SplitOptions:
    """How a new split is made: fractions, seed, and the dataset layout a task reads (for
    segmentation: the image and mask folder names and the colour map; None for classification)."""

    val: float = 0.1
    test: float = 0.2
    seed: int = 0
    progress: bool = True
    layout: dict[str, Any] | None = None


def resolve_split(
    data_dir: str | os.PathLike,
    run_dir: str | os.PathLike | None,
    split_file: str | os.PathLike | None = None,
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    task: Any = None,
    layout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The split an earlier stage wrote when it applies to this data folder, otherwise a new one
    (written to `run_dir/split.json`, where later stages will find it). `task` (a host Task; default
    classification) scans the folder and makes the split."""
    if task is None:
        from .tasks import get_task

        task = get_task("classification")
    root = Path(data_dir).resolve()
    candidates = [split_file] if split_file else []
    if run_dir is not None:
        candidates.append(Path(run_dir) / "split.json")
    for cand in candidates:
        if cand and Path(cand).is_file():
            split = load_split(cand)
            if Path(split["root"]) == root:
                task.check_split(split, root)
                if run_dir is not None and Path(cand) != Path(run_dir) / "split.json":
                    save_split(split, Path(run_dir) / "split.json")
                return split
            if split_file and Path(cand) == Path(split_file):
                raise DatasetError(f"split {cand} was made for {split['root']}, not {root}")
    split = task.new_split(root, SplitOptions(val=val, test=test, seed=seed, progress=progress, layout=layout))
    if run_dir is not None:
        save_split(split, Path(run_dir) / "split.json")
    return split


def check_folder_split(split: dict[str, Any], root: Path) -> None:
    """A classification split still fits its folder: same classes, no image gone."""
    classes_now, samples = scan_image_folder(root)
    check_classes(split["classes"], classes_now, what=f"folder {root}")
    present = {rel for rel, _ in samples}
    lost = [rel for part in ("train", "val", "test") for rel, _ in split[part] if rel not in present]
    if lost:
        raise DatasetError(f"{len(lost)} image(s) of split for {root} are gone from it, e.g. {lost[0]}")


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

        rel, label = self.items[index]
        path = self.root / rel
        try:
            img = open_rgb(path)
        except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
            raise UnreadableImage(str(path), f"{type(e).__name__}: {e}") from e
        if self.transform is not None:
            img = self.transform(img)
        return img, label


class Unreadable:
    """What `SkipUnreadable` yields in place of an image it cannot read: picklable, so it crosses
    from a DataLoader worker to the collate function, which drops it."""

    __slots__ = ("path", "error")

    def __init__(self, path: str, error: str):
        self.path, self.error = path, error

    def __reduce__(self):
        return Unreadable, (self.path, self.error)


class SkipUnreadable:
    """A dataset view that turns an image which became unreadable after the split into an
    `Unreadable` marker, as the split skipped the ones unreadable at split time: a training run of
    hours must not die (in a DataLoader worker, with a traceback) on one file."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except UnreadableImage as e:
            return Unreadable(e.path, e.error)


def collate_readable(batch: Sequence[Any], collate: Callable[[list[Any]], Any] | None = None):
    """Collate the readable samples of a batch with `collate` (the task's; default: torch's
    default_collate); returns (collated batch or None, skipped paths)."""
    from torch.utils.data import default_collate

    good = [b for b in batch if not isinstance(b, Unreadable)]
    skipped = [f"{b.path}: {b.error}" for b in batch if isinstance(b, Unreadable)]
    return ((collate or default_collate)(good) if good else None), skipped
