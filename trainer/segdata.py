"""Segmentation datasets: images and masks in the layouts people publish, a split by image, and
the training (patches, joint augmentation) and evaluation (whole images) datasets.

Layout. Images and masks live in two sibling folders and are matched by file stem at the same
sub-path (`images/a/x.jpg` <-> `masks/a/x.png`): `images/` + `masks/` (or `labels/`,
`annotations/`), Pascal VOC `JPEGImages/` + `SegmentationClass/`, at any depth, so nested groups
such as the Dubai set's `Tile N/images` + `Tile N/masks` are all found. `--images NAME` /
`--masks NAME` name the two folders (a name matched at any depth, or a path relative to the root)
when convention does not find them. Stems also match after dropping a conventional suffix
(`x_sat.jpg` <-> `x_mask.png`). Images with no mask and masks with no image are counted and named
in the scan and the split, never silently dropped.

Pre-split sets. When every image's path has a `train/` (`training/`) component and the others a
`val/` (`valid/`, `validation/`) or `test/` (`testing/`) one, in either nesting
(`train/images/...` or `images/train/...`), the published parts are kept as they are. A part the
set does not publish is carved from its training images with the requested fraction, seeded and by
image; the split's `notes` say so. A set whose folders are only partly split this way is split as
a whole (noted too).

Colour map. `--colormap FILE` (absolute, or relative to the working directory or the root), else
`class_dict.csv` at the dataset root, else a JSON colour map there (`class_dict.json`,
`classes.json`, `colormap.json`, `colors.json`). class_dict.csv wins when both exist: the Dubai
set's published `classes.json` lists wrong colours, its class_dict.csv the real ones. Without a
colour map masks hold class indices; the class count is then the largest index found in the masks
(the ignore value 255 excluded) plus one, and the classes are named `class_0`, `class_1`, ...
A split of a colour-mask set where most pixels have colours in no class is refused: the colour
map is not the one of these masks.

Training patches. Every tile is cut into `input_size` windows with `overlap` (the runtime's
`window_grid`); a tile smaller than the window is padded at its bottom/right, the image by
reflection (edge replication when too small) and the mask with the ignore label. Augmentation is
joint (torchvision.transforms.v2 on tv_tensors.Image + tv_tensors.Mask): a random scale + crop
(area 0.5..1 of the window, the window's aspect ratio, resized back), horizontal and vertical
flips, and 90-degree rotations when the window is square; masks are only ever resized nearest.
Each DataLoader worker keeps the last few decoded tiles (`cache` tiles, an LRU): patches of one
tile read consecutively decode it once. A shuffled sampler over all patches scatters them, so
`TileGroupedSampler` shuffles groups of tiles and the patches inside each group instead.
"""
from __future__ import annotations

import os
import random
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from rsedge.runtime.imagefolder import image_files, is_hidden, is_image_name
from rsedge.runtime.masks import (
    IGNORE_INDEX,
    ColorMap,
    MaskError,
    NeedsColormap,
    image_size,
    read_colormap,
    read_mask,
    read_rgb,
)
from rsedge.runtime.tiling import pad_to_window, window_grid

from .datasets import SPLIT_FORMAT, DatasetError, UnreadableImage, stratified_split
from .records import atomic_write_json, read_json
from .transforms import IMAGENET_MEAN, IMAGENET_STD

IMAGE_DIRS = ("images", "image", "imgs", "img", "jpegimages", "rgb")
MASK_DIRS = ("masks", "mask", "segmentationclass", "labels", "label", "gt", "annotations")
IMAGE_SUFFIXES = ("_sat", "_image", "_img", "_rgb")
MASK_SUFFIXES = ("_mask", "_masks", "_label", "_labels", "_gt", "_seg", "_segmentation")
PARTS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
         "test": "test", "testing": "test"}
CSV_COLORMAP = "class_dict.csv"
JSON_COLORMAPS = ("class_dict.json", "classes.json", "colormap.json", "colors.json")
EXAMPLES = 5
UNKNOWN_LIMIT = 0.5


@dataclass
class SegLayout:
    """The user's layout options (`--images`, `--masks`, `--colormap`); None = by convention. The
    host stores them in the model's metadata as `layout`, so later stages need only `--data`."""

    images: str | None = None
    masks: str | None = None
    colormap: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SegLayout:
        data = data or {}
        if isinstance(data.get("options"), dict):  # a resolved layout (scan / split) holds the options
            data = data["options"]
        return cls(**{k: data.get(k) for k in ("images", "masks", "colormap")})


@dataclass
class SegScan:
    """What `scan_segmentation` found. `layout` is the resolved layout: folder names found,
    colour map (absolute path or None), mask kind ("color" or "index"), the user's options."""

    root: str
    pairs: list[tuple[str, str]]
    classes: list[str]
    colors: list[list[int]] | None
    ignore_index: int
    presplit: dict[str, list[tuple[str, str]]] | None
    layout: dict[str, Any]
    colormap: ColorMap | None = None
    unmatched_images: list[str] = field(default_factory=list)
    unmatched_masks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -- layout ---------------------------------------------------------------------------------------

def _dir_matcher(wanted: str | None, defaults: Sequence[str], root: Path):
    """A test of a folder (path) against the user's name / relative path, or the conventional names."""
    if wanted:
        target = wanted.strip("/").lower()
        return lambda d: d.name.lower() == target or d.relative_to(root).as_posix().lower() == target
    return lambda d: d.name.lower() in defaults


def _has_images(folder: Path) -> bool:
    return any(any(is_image_name(n) for n in names) for _, _, names in os.walk(folder))


def _folder_pairs(root: Path, layout: SegLayout) -> list[tuple[Path, Path]]:
    """(image folder, mask folder) pairs: siblings found at any depth below root."""
    if layout.images and layout.masks and (root / layout.images).is_dir() and (root / layout.masks).is_dir() \
            and ("/" in layout.images or "/" in layout.masks):
        return [(root / layout.images, root / layout.masks)]
    is_image = _dir_matcher(layout.images, IMAGE_DIRS, root)
    is_mask = _dir_matcher(layout.masks, MASK_DIRS, root)
    rank = {n: i for i, n in enumerate(MASK_DIRS)}
    found = []
    for here, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        subs = [Path(here) / d for d in dirs]
        images = [d for d in subs if is_image(d)]
        masks = sorted((d for d in subs if is_mask(d) and d not in images), key=lambda d: rank.get(d.name.lower(), -1))
        masks = [d for d in masks if _has_images(d)]
        for img in images:
            if masks:
                found.append((img, masks[0]))
        if images and masks:
            dirs[:] = [d for d in dirs if Path(here) / d not in images + masks]
    return found


def _key(rel: str, suffixes: Sequence[str]) -> tuple[str, str]:
    """(exact key, key without a conventional suffix): the sub-path and the stem, no extension."""
    stem = rel.rsplit(".", 1)[0]
    low = stem.lower()
    stripped = next((stem[: -len(s)] for s in suffixes if low.endswith(s)), stem)
    return stem, stripped


def _index_by_key(files: list[str], suffixes: Sequence[str], folder: Path) -> tuple[dict, dict]:
    exact, loose = {}, {}
    for rel in files:
        k, s = _key(rel, suffixes)
        if k in exact:
            raise DatasetError(f"{folder} holds two files with the stem {k!r} ({exact[k]} and {rel}): which one "
                               f"is meant? remove or rename one")
        exact[k] = rel
        loose.setdefault(s, rel)
    return exact, loose


def _match(img_dir: Path, mask_dir: Path, root: Path):
    """(pairs, unmatched images, unmatched masks), paths relative to root."""
    images, masks = image_files(str(img_dir)), image_files(str(mask_dir))
    img_exact, _ = _index_by_key(images, IMAGE_SUFFIXES, img_dir)
    mask_exact, mask_loose = _index_by_key(masks, MASK_SUFFIXES, mask_dir)
    pairs, lonely, used = [], [], set()
    for key, rel in img_exact.items():
        m = mask_exact.get(key) or mask_loose.get(_key(rel, IMAGE_SUFFIXES)[1])
        if m is None or m in used:
            lonely.append(rel)
            continue
        used.add(m)
        pairs.append(((img_dir / rel).relative_to(root).as_posix(), (mask_dir / m).relative_to(root).as_posix()))
    orphans = [(mask_dir / m).relative_to(root).as_posix() for m in masks if m not in used]
    return pairs, [(img_dir / r).relative_to(root).as_posix() for r in lonely], orphans


def _part_of(rel: str) -> str | None:
    return next((PARTS[p.lower()] for p in rel.split("/")[:-1] if p.lower() in PARTS), None)


def _presplit(pairs: list[tuple[str, str]], notes: list[str]) -> dict[str, list[tuple[str, str]]] | None:
    parts = [_part_of(img) for img, _ in pairs]
    if not any(parts):
        return None
    if None in parts or "train" not in parts:
        notes.append("some folders are named train/val/test but not every image is in a train/ part: the "
                     "published parts are ignored and the whole set is split")
        return None
    out: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for pair, part in zip(pairs, parts):
        out[part].append(pair)
    return out


def _find_colormap(root: Path, layout: SegLayout, notes: list[str]) -> Path | None:
    if layout.colormap:
        given = Path(layout.colormap).expanduser()
        for cand in (given, root / given):
            if cand.is_file():
                return cand.resolve()
        raise DatasetError(f"colour map not found: {layout.colormap} (nor {root / given})")
    csv_path = root / CSV_COLORMAP
    jsons = [root / n for n in JSON_COLORMAPS if (root / n).is_file()]
    if csv_path.is_file():
        if jsons:
            notes.append(f"colour map: {CSV_COLORMAP} used, {jsons[0].name} ignored ({CSV_COLORMAP} wins)")
        return csv_path.resolve()
    return jsons[0].resolve() if jsons else None


def _looked_for(layout: SegLayout) -> str:
    images = f"a folder named or at {layout.images!r}" if layout.images else "/".join(IMAGE_DIRS[:5])
    masks = f"a folder named or at {layout.masks!r}" if layout.masks else "/".join(MASK_DIRS)
    return (f"image folders ({images}) beside mask folders ({masks}) holding files of the same stem; "
            f"name them with --images NAME --masks NAME")


def _scan_folders(root: Path, layout: SegLayout) -> SegScan:
    """The pairs, the colour map and the published parts; no pixel decoded (classes are filled in
    by `_finish_classes` for index masks)."""
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    notes: list[str] = []
    pairs, lonely, orphans = [], [], []
    folders = _folder_pairs(root, layout)
    for img_dir, mask_dir in folders:
        p, li, om = _match(img_dir, mask_dir, root)
        pairs += p
        lonely += li
        orphans += om
    if not pairs:
        detail = f" ({len(folders)} folder pair(s) found, but no file stems in common)" if folders else ""
        raise DatasetError(f"no image/mask pairs under {root}{detail}: looked for {_looked_for(layout)}")
    cmap_path = _find_colormap(root, layout, notes)
    cmap = read_colormap(str(cmap_path)) if cmap_path else None
    resolved = {
        "images": sorted({d.name for d, _ in folders}), "masks": sorted({m.name for _, m in folders}),
        "folders": len(folders), "colormap": str(cmap_path) if cmap_path else None,
        "mask_kind": "color" if cmap else "index", "options": layout.to_dict(),
        "ignore_colors": [list(c) for c in cmap.ignore_colors] if cmap else [],
    }
    for what, items in (("image(s) without a mask", lonely), ("mask(s) without an image", orphans)):
        if items:
            notes.append(f"{len(items)} {what}, not used, e.g. {', '.join(sorted(items)[:EXAMPLES])}")
    pairs.sort()
    return SegScan(str(root), pairs, list(cmap.names) if cmap else [], [list(c) for c in cmap.colors] if cmap else None,
                   IGNORE_INDEX, _presplit(pairs, notes), resolved, cmap, sorted(lonely), sorted(orphans), notes)


# -- decoding every pair once ---------------------------------------------------------------------

def _check_pair(root: Path, pair: tuple[str, str], cmap: ColorMap | None, num_classes: int | None) -> dict:
    img_rel, mask_rel = pair
    try:
        h, w = read_rgb(str(root / img_rel)).shape[:2]
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
        return {"error": f"image: {type(e).__name__}: {e}"}
    try:
        mask, stats = read_mask(str(root / mask_rel), cmap, num_classes, IGNORE_INDEX)
    except NeedsColormap as e:
        return {"fatal": str(e)}
    except Exception as e:  # noqa: BLE001
        return {"error": f"mask: {type(e).__name__}: {e}"}
    if mask.shape != (h, w):
        return {"error": f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {w}x{h}"}
    valid = mask[mask != IGNORE_INDEX]
    stats["per_class"] = np.bincount(valid.ravel().astype(np.int64)).tolist() if valid.size else []
    stats["size"] = [h, w]
    return stats


def check_pairs(root: Path, pairs: Sequence[tuple[str, str]], cmap: ColorMap | None, num_classes: int | None = None,
                progress: bool = True) -> list[dict]:
    """Decode every image and mask once (threads: Pillow and numpy release the GIL); a dict per
    pair: {"error"} or mask stats + "size" + "per_class" pixel counts."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        it = pool.map(lambda p: _check_pair(root, p, cmap, num_classes), pairs)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(pairs), desc="checking images and masks", unit="pair", leave=False)
        results = list(it)
    fatal = next((r["fatal"] for r in results if "fatal" in r), None)
    if fatal:
        raise DatasetError(fatal)
    return results


def _pixel_totals(results: Sequence[dict], num_classes: int) -> dict[str, Any]:
    good = [r for r in results if "error" not in r]
    per_class = np.zeros(num_classes, np.int64)
    for r in good:
        counts = np.asarray(r["per_class"][:num_classes], np.int64)
        per_class[: len(counts)] += counts
    unknown_colors = []
    for r in good:
        unknown_colors += [c for c in r["unknown_colors"] + r["unknown_values"] if c not in unknown_colors]
    return {"total": sum(r["pixels"] for r in good), "ignored": sum(r["ignored"] for r in good),
            "unknown": sum(r["unknown"] for r in good), "unknown_colors": unknown_colors[:EXAMPLES],
            "per_class": per_class.tolist()}


def _finish_classes(scan: SegScan, results: Sequence[dict]) -> None:
    """Index masks: classes from the largest index found; colour masks: refuse a colour map that
    matches few pixels."""
    good = [r for r in results if "error" not in r]
    if scan.colormap is None:
        top = max((len(r["per_class"]) for r in good), default=0)
        ignored = sum(r["ignored"] for r in good)
        if top <= 1 and ignored:
            raise DatasetError(f"the masks under {scan.root} hold only {'0 and ' if top else ''}{IGNORE_INDEX}, the "
                               f"ignore label ({ignored} pixels): if they are 0/255 binary masks give a colour map "
                               f"such as background,0,0,0 + foreground,255,255,255 with --colormap")
        if top > IGNORE_INDEX:
            raise DatasetError(f"index masks under {scan.root} hold values up to {top - 1}: more than {IGNORE_INDEX} "
                               f"classes is not supported (the ignore label is {IGNORE_INDEX})")
        scan.classes = [f"class_{i}" for i in range(top)]
        return
    total = sum(r["pixels"] for r in good)
    unknown = sum(r["unknown"] for r in good)
    if total and unknown / total > UNKNOWN_LIMIT:
        examples = ", ".join("#{:02x}{:02x}{:02x}".format(*c)
                             for c in _pixel_totals(good, scan.colormap.num_classes)["unknown_colors"])
        raise DatasetError(f"{100 * unknown / total:.0f}% of the mask pixels have colours in no class of "
                           f"{scan.layout['colormap']} (e.g. {examples}): is it the colour map of these masks? "
                           f"give the right one with --colormap")


def scan_segmentation(root: str | os.PathLike, layout: SegLayout | None = None, progress: bool = False) -> SegScan:
    """Pairs, classes, colours and layout of a segmentation dataset. Index masks (no colour map)
    are decoded to count the classes; colour masks are not decoded here."""
    scan = _scan_folders(Path(root).resolve(), layout or SegLayout())
    if scan.colormap is None:
        _finish_classes(scan, check_pairs(Path(scan.root), scan.pairs, None, None, progress))
    return scan


# -- the split ------------------------------------------------------------------------------------

def _split_parts(scan: SegScan, good: list[tuple[str, str]], val: float, test: float, seed: int):
    """(parts, notes): the published parts (what is missing carved from train) or a seeded split."""
    def split(items, v, t):
        parts = stratified_split([(pair, 0) for pair in items], v, t, seed)
        return {k: [pair for pair, _ in vs] for k, vs in parts.items()}

    if scan.presplit is None:
        return split(good, val, test), []
    keep = set(good)
    published = {k: [p for p in v if p in keep] for k, v in scan.presplit.items()}
    missing = [k for k in ("val", "test") if not published[k]]
    if not missing:
        return published, []
    carved = split(published["train"], val if "val" in missing else 0.0, test if "test" in missing else 0.0)
    parts = {k: published[k] or carved[k] for k in ("val", "test")}
    parts["train"] = carved["train"]
    fractions = {"val": val, "test": test}
    notes = [f"no published {k} part: {len(parts[k])} image(s) ({fractions[k]:.0%}) of train taken as {k}, seeded"
             for k in missing]
    return parts, notes


def make_segmentation_split(
    root: str | os.PathLike, layout: SegLayout | None = None, val: float = 0.1, test: float = 0.2, seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """A split by image (tile, never by patch), seeded, in the rsedge split format; every pair is
    decoded once and unreadable ones are listed under `skipped`."""
    scan = _scan_folders(Path(root).resolve(), layout or SegLayout())
    results = check_pairs(Path(scan.root), scan.pairs, scan.colormap, None, progress)
    _finish_classes(scan, results)
    skipped = [{"path": img, "mask": mask, "error": r["error"]} for (img, mask), r in zip(scan.pairs, results)
               if "error" in r]
    good = [pair for pair, r in zip(scan.pairs, results) if "error" not in r]
    if not good:
        raise DatasetError(f"none of the {len(scan.pairs)} image/mask pairs under {scan.root} could be read, "
                           f"e.g. {skipped[0]['path']}: {skipped[0]['error']}")
    parts, notes = _split_parts(scan, good, val, test, seed)
    return {
        "format": SPLIT_FORMAT, "task": "segmentation", "root": scan.root, "classes": scan.classes,
        "colors": scan.colors, "ignore_index": scan.ignore_index, "layout": scan.layout, "seed": seed,
        "fractions": {"val": val, "test": test}, "presplit": scan.presplit is not None,
        "counts": {k: len(v) for k, v in parts.items()},
        "pixels": _pixel_totals(results, len(scan.classes)),
        "unmatched": {"images": len(scan.unmatched_images), "masks": len(scan.unmatched_masks),
                      "examples": (scan.unmatched_images + scan.unmatched_masks)[:EXAMPLES]},
        "notes": scan.notes + notes,
        "skipped": skipped,
        **{k: [[img, mask] for img, mask in parts[k]] for k in ("train", "val", "test")},
    }


def check_segmentation_split(split: dict[str, Any]) -> None:
    """Every image and mask of the split still exists (a clear error naming a missing one)."""
    if split.get("task") != "segmentation":
        raise DatasetError(f"the split of {split.get('root')} is not a segmentation split")
    root = Path(split["root"])
    missing = [rel for part in ("train", "val", "test") for pair in split[part] for rel in pair
               if not (root / rel).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} file(s) of the split are gone from {root}, e.g. {missing[0]}")


def resolve_segmentation_split(
    data_dir: str | os.PathLike, run_dir: str | os.PathLike | None, layout: SegLayout | None = None,
    split_file: str | os.PathLike | None = None, val: float = 0.1, test: float = 0.2, seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The segmentation split an earlier stage wrote for this folder (checked), else a new one,
    written to `run_dir/split.json`."""
    root = Path(data_dir).resolve()
    candidates = [Path(split_file)] if split_file else []
    if run_dir is not None:
        candidates.append(Path(run_dir) / "split.json")
    for cand in candidates:
        if not cand.is_file():
            continue
        split = read_json(cand)
        if split.get("format") != SPLIT_FORMAT or split.get("task") != "segmentation":
            raise DatasetError(f"{cand} is not an rsedge segmentation split")
        if Path(split["root"]) != root:
            if split_file and cand == Path(split_file):
                raise DatasetError(f"split {cand} was made for {split['root']}, not {root}")
            continue
        given = {k: v for k, v in (layout or SegLayout()).to_dict().items() if v}
        made = SegLayout.from_dict(split.get("layout")).to_dict()
        differ = {k: v for k, v in given.items() if made.get(k) != v}
        if differ:
            raise DatasetError(f"split {cand} was made with layout options {made}, not {differ}: remove it or "
                               f"give the same options")
        check_segmentation_split(split)
        if run_dir is not None and cand != Path(run_dir) / "split.json":
            atomic_write_json(Path(run_dir) / "split.json", split)
        return split
    split = make_segmentation_split(root, layout, val=val, test=test, seed=seed, progress=progress)
    if run_dir is not None:
        atomic_write_json(Path(run_dir) / "split.json", split)
    return split


# -- datasets -------------------------------------------------------------------------------------

def colormap_of(meta: dict[str, Any]) -> ColorMap | None:
    """The colour map of a model's metadata (classes + colors; None: index masks). The unlabelled
    colours come from the resolved layout (`data_layout`, or `layout` when it is a dict); without
    them an unlabelled pixel still becomes the ignore label, counted as a colour in no class."""
    colors = meta.get("colors")
    if colors is None:
        return None
    layout = next((v for v in (meta.get("data_layout"), meta.get("layout")) if isinstance(v, dict)), {})
    return ColorMap(meta["classes"], colors, layout.get("ignore_colors") or ())


def read_pair(root: str | os.PathLike, image_rel: str, mask_rel: str, meta: dict[str, Any],
              colormap: ColorMap | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 image, HxW uint8/uint16 index mask) of one split item, read as the model's
    metadata says (colours, class count, ignore label); UnreadableImage when a file cannot be read."""
    cmap = colormap if colormap is not None else colormap_of(meta)
    path = Path(root) / image_rel
    try:
        image = read_rgb(str(path))
        path = Path(root) / mask_rel
        mask, _ = read_mask(str(path), cmap, len(meta["classes"]), int(meta.get("ignore_index", IGNORE_INDEX)))
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
        raise UnreadableImage(str(path), f"{type(e).__name__}: {e}") from e
    if mask.shape != image.shape[:2]:
        raise UnreadableImage(str(path), f"mask is {mask.shape[1]}x{mask.shape[0]}, image "
                                         f"{image.shape[1]}x{image.shape[0]}")
    return image, mask


class _SegBase:
    """Reads (image HxWx3 uint8, mask HxW int64) of an item, with an LRU cache of decoded tiles.
    The cache is per process: it is emptied when the dataset is pickled into a DataLoader worker."""

    def __init__(self, root: str | os.PathLike, items: Sequence[Sequence[str]], meta: dict[str, Any], cache: int = 2):
        self.root = Path(root)
        self.items = [(str(a), str(b)) for a, b in items]
        self.classes = list(meta["classes"])
        self.ignore_index = int(meta.get("ignore_index", IGNORE_INDEX))
        self.meta = {"classes": self.classes, "ignore_index": self.ignore_index}
        self.colormap = colormap_of(meta)
        norm = meta.get("normalization") or {}
        self.mean = [float(v) for v in norm.get("mean", IMAGENET_MEAN)]
        self.std = [float(v) for v in norm.get("std", IMAGENET_STD)]
        self.cache_size = int(cache)
        self._cache: OrderedDict = OrderedDict()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = read_pair(self.root, *self.items[index], self.meta, self.colormap)
        return image, mask.astype(np.int64)

    def _prepare(self, image: np.ndarray, mask: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
        """What the cache keeps of a decoded tile (the patch dataset pads it)."""
        return image, mask

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        entry = self._prepare(*self._decode(index), index)
        if self.cache_size > 0:
            self._cache[index] = entry
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return entry

    def __len__(self) -> int:
        return len(self.items)


def joint_transform(size: Sequence[int] | None, augment: bool, mean: Sequence[float], std: Sequence[float]):
    """torchvision v2 pipeline over (tv_tensors.Image uint8, tv_tensors.Mask): augmentation when
    asked (size: the window), then float 0..1 and Normalize on the image only."""
    steps = []
    if augment:
        h, w = int(size[0]), int(size[1])
        steps += [v2.RandomResizedCrop((h, w), scale=(0.5, 1.0), ratio=(w / h, w / h), antialias=True),
                  v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        if h == w:
            steps.append(RandomRot90())
    steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


class RandomRot90(v2.Transform):
    """A rotation by k * 90 degrees, k uniform in 0..3, the same for every input (exact: no resampling)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["k"] == 0 or not isinstance(inpt, torch.Tensor):
            return inpt
        return tv_tensors.wrap(torch.rot90(inpt, params["k"], dims=(-2, -1)), like=inpt)


def _to_tensors(image: np.ndarray, mask: np.ndarray):
    return (tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))),
            tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask))))


def _plain(image, mask):
    return image.as_subclass(torch.Tensor).contiguous(), mask.as_subclass(torch.Tensor).long().contiguous()


class SegmentationPatches(_SegBase):
    """Training patches: every tile cut into meta["input_size"] windows with meta["overlap"];
    (float32 3xHxW normalized, int64 HxW mask with the ignore label). Tile sizes come from the
    file headers; a tile whose header cannot be read is left out and listed in `skipped`."""

    def __init__(self, root, items, meta: dict[str, Any], augment: bool = False, cache: int = 4):
        super().__init__(root, items, meta, cache)
        self.window = (int(meta["input_size"][0]), int(meta["input_size"][1]))
        self.overlap = int(meta.get("overlap") or 0)
        self.augment = augment
        self.windows: list[tuple[int, int, int]] = []
        self.sizes: list[tuple[int, int] | None] = []
        self.skipped: list[dict[str, str]] = []
        th, tw = self.window
        for i, (img_rel, _) in enumerate(self.items):
            try:
                h, w = image_size(str(self.root / img_rel))
            except Exception as e:  # noqa: BLE001
                self.sizes.append(None)
                self.skipped.append({"path": img_rel, "error": f"{type(e).__name__}: {e}"})
                continue
            self.sizes.append((h, w))
            self.windows += [(i, y, x) for y, x in window_grid(max(h, th), max(w, tw), th, tw, self.overlap)]
        self.transform = joint_transform(self.window, augment, self.mean, self.std)

    def __len__(self) -> int:
        return len(self.windows)

    def tile_of(self, index: int) -> int:
        return self.windows[index][0]

    def _prepare(self, image, mask, index):
        if self.sizes[index] != image.shape[:2]:
            raise UnreadableImage(str(self.root / self.items[index][0]),
                                  f"its size changed since the dataset was made ({self.sizes[index]} -> "
                                  f"{image.shape[:2]})")
        th, tw = self.window
        image, _ = pad_to_window(image.transpose(2, 0, 1), th, tw)
        ph, pw = max(0, th - mask.shape[0]), max(0, tw - mask.shape[1])
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=self.ignore_index) if ph or pw else mask
        return image.transpose(1, 2, 0), mask

    def __getitem__(self, index: int):
        i, y, x = self.windows[index]
        image, mask = self.load(i)
        th, tw = self.window
        return _plain(*self.transform(*_to_tensors(image[y:y + th, x:x + tw], mask[y:y + th, x:x + tw])))


class SegmentationImages(_SegBase):
    """Evaluation: the whole image, normalized (any size), and its full mask; batch with
    `collate_tiles` (sizes differ), predict with the runtime's `sliding_window`."""

    def __init__(self, root, items, meta: dict[str, Any], cache: int = 0):
        super().__init__(root, items, meta, cache)
        self.transform = joint_transform(None, False, self.mean, self.std)

    def __getitem__(self, index: int):
        return _plain(*self.transform(*_to_tensors(*self.load(index))))


def collate_tiles(batch: Sequence[Any]):
    """(list of image tensors, list of mask tensors): whole images of different sizes."""
    return [b[0] for b in batch], [b[1] for b in batch]


class TileGroupedSampler:
    """Patch indices in an order the tile cache serves: tiles shuffled, taken `group` at a time,
    and the patches of a group shuffled together (so a batch mixes a few tiles). Reshuffled at
    every iteration (epoch), deterministically from `seed`."""

    def __init__(self, dataset: SegmentationPatches, group: int = 4, seed: int = 0):
        self.dataset, self.group, self.seed, self.epoch = dataset, max(1, int(group)), int(seed), 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        rng = random.Random(self.seed * 100003 + self.epoch)
        self.epoch += 1
        by_tile: dict[int, list[int]] = {}
        for k, (tile, _, _) in enumerate(self.dataset.windows):
            by_tile.setdefault(tile, []).append(k)
        tiles = sorted(by_tile)
        rng.shuffle(tiles)
        for start in range(0, len(tiles), self.group):
            chunk = [k for t in tiles[start:start + self.group] for k in by_tile[t]]
            rng.shuffle(chunk)
            yield from chunk


def count_ignored(root: str | os.PathLike, items: Sequence[Sequence[str]], meta: dict[str, Any],
                  progress: bool = False) -> dict[str, Any]:
    """Pixels of the items' masks: total, ignored (unlabelled, unknown colour or value, ignore
    label), unknown (colour / value in no class) with a few examples, per class."""
    root = Path(root)
    cmap = colormap_of(meta)
    num = len(meta["classes"])

    def one(pair):
        try:
            mask, stats = read_mask(str(root / pair[1]), cmap, num, int(meta.get("ignore_index", IGNORE_INDEX)))
        except (OSError, ValueError, MaskError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
        stats["per_class"] = np.bincount(mask[mask < num].ravel().astype(np.int64), minlength=num).tolist()
        return stats

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        it = pool.map(one, [tuple(p) for p in items])
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(items), desc="counting mask pixels", unit="mask", leave=False)
        results = list(it)
    out = _pixel_totals(results, num)
    out["unreadable"] = sum(1 for r in results if "error" in r)
    return out
