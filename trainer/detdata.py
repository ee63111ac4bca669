"""Detection datasets: boxes in the three layouts people publish, read on the host, and a split by
image in the rsedge split format.

Layouts, recognised in this order under the dataset root:
- COCO json: a `.json` at the root or in `annotations/` holding `images`, `annotations` (bbox
  `[x, y, w, h]` in pixels) and `categories`. Category ids map to contiguous indices 0..C-1 in
  sorted id order (COCO's 1..90 with gaps become 0..79); the names are kept. Several such files
  (e.g. instances_train / instances_val) are merged when their categories agree.
- NWPU VHR-10 as published: `positive image set/NNN.jpg` + `ground truth/NNN.txt`, one box a line
  `(x1,y1),(x2,y2),cls` with cls 1..10; a `negative image set/` is read as background images.
- YOLO txt: `images/` + `labels/` sibling trees (same sub-path, `.txt`), or a `.txt` beside each
  image; one box a line `cls cx cy w h` normalized to the image size. Class names come from
  `--names FILE` (a darknet `.names` / `classes.txt`, one name a line, or a `data.yaml` whose
  `names:` is a list or an `{id: name}` map), else from such a file found next to the images or at
  the root; without one, classes are named `class_0`, `class_1`, ... up to the largest index.

Bad labels are counted in the scan's `report`, never a crash: a class out of range, a degenerate
box (width or height <= 0) and a malformed line are dropped; a box partly outside its image is
clipped to it (counted as clipped), one wholly outside is dropped (counted); a label file without
its image is counted and named; an image without labels is kept as a background image (counted).
An image whose header cannot be read is left out of the items and named in `report["unreadable"]`;
the split decodes every image once and lists all unreadable ones under `skipped`.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rsedge.runtime.imagefolder import image_files, is_hidden
from rsedge.runtime.masks import image_size

from .datasets import SPLIT_FORMAT, DatasetError, find_corrupt, stratified_split

NWPU_CLASSES = ["airplane", "ship", "storage tank", "baseball diamond", "tennis court", "basketball court",
                "ground track field", "harbor", "bridge", "vehicle"]
NWPU_IMAGES, NWPU_LABELS, NWPU_NEGATIVE = "positive image set", "ground truth", "negative image set"
YOLO_IMAGE_DIRS, YOLO_LABEL_DIRS = ("images",), ("labels",)
NAMES_FILES = ("data.yaml", "dataset.yaml", "data.yml", "classes.txt", "classes.names", "obj.names")
EXAMPLES = 5
_NUM = r"\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*"
_NWPU_LINE = re.compile(rf"^\(?{_NUM},{_NUM}\)?\s*,\s*\(?{_NUM},{_NUM}\)?\s*,\s*(\d+)\s*$")
REPORT_KEYS = ("class_out_of_range", "degenerate", "clipped", "outside_dropped", "malformed",
               "labels_without_image", "background_images")


@dataclass
class DetLayout:
    """The user's layout options (`--names`); None = by convention. Stored in the model's metadata
    as part of `layout`, so later stages need only `--data`."""

    names: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DetLayout:
        data = data or {}
        if isinstance(data.get("options"), dict):  # a resolved layout (scan / split) holds the options
            data = data["options"]
        return cls(names=data.get("names"))


@dataclass
class DetScan:
    """What `scan_detection` found: items (image path relative to root, boxes (K, 4) float32 xyxy
    in pixels, classes (K,) int64), class names, the resolved layout and the bad-label report."""

    root: str
    items: list[tuple[str, np.ndarray, np.ndarray]]
    classes: list[str]
    layout: dict[str, Any]
    report: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _new_report() -> dict[str, Any]:
    report: dict[str, Any] = {k: 0 for k in REPORT_KEYS}
    report["unreadable"] = {}
    report["examples"] = {"labels_without_image": [], "background_images": [], "malformed": []}
    return report


def _count(report: dict[str, Any], key: str, example: str | None = None, n: int = 1) -> None:
    report[key] += n
    if example is not None and key in report["examples"] and len(report["examples"][key]) < EXAMPLES:
        report["examples"][key].append(example)


# -- label readers ----------------------------------------------------------------------------------

def _parse_nwpu(text: str) -> tuple[list[tuple[float, float, float, float, int]], list[str]]:
    rows, bad = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _NWPU_LINE.match(line.strip())
        if m is None:
            bad.append(line.strip())
            continue
        x1, y1, x2, y2 = (float(v) for v in m.groups()[:4])
        rows.append((x1, y1, x2, y2, int(m.group(5)) - 1))
    return rows, bad


def read_nwpu_label(path: str | os.PathLike) -> list[tuple[float, float, float, float, int]]:
    """(x1, y1, x2, y2, class index from 0) per line of an NWPU VHR-10 `ground truth/NNN.txt`
    (`(x1,y1),(x2,y2),cls`, cls 1..10); blank and malformed lines are skipped (the scan counts them)."""
    return _parse_nwpu(Path(path).read_text(errors="replace"))[0]


def _parse_yolo(text: str, width: int, height: int) -> tuple[list[tuple[float, float, float, float, int]], list[str]]:
    rows, bad = [], []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 5:
                raise ValueError
            cls_f, cx, cy, w, h = (float(v) for v in parts)
            if cls_f != int(cls_f) or not all(math.isfinite(v) for v in (cx, cy, w, h)):
                raise ValueError
        except ValueError:
            bad.append(line.strip())
            continue
        rows.append(((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height,
                     int(cls_f)))
    return rows, bad


def _clean(rows, width: int, height: int, num_classes: int | None, report: dict[str, Any]):
    """Boxes (K, 4) float32 and classes (K,) int64 after the checks; every drop or clip is counted."""
    boxes, classes = [], []
    for x1, y1, x2, y2, c in rows:
        if c < 0 or (num_classes is not None and c >= num_classes):
            _count(report, "class_out_of_range")
            continue
        if x2 <= x1 or y2 <= y1:
            _count(report, "degenerate")
            continue
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
        if cx2 <= cx1 or cy2 <= cy1:
            _count(report, "outside_dropped")
            continue
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            _count(report, "clipped")
        boxes.append((cx1, cy1, cx2, cy2))
        classes.append(c)
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64)


def _size(path: Path, report: dict[str, Any]) -> tuple[int, int] | None:
    """(width, height) from the header only (no pixel decode); None, recorded in the report's
    `unreadable` map, when the header cannot be read."""
    try:
        h, w = image_size(str(path))
        return w, h
    except Exception as e:  # noqa: BLE001 - any reader failure means the file is unusable
        report["unreadable"][str(path)] = f"{type(e).__name__}: {e}"
        return None


# -- class names ------------------------------------------------------------------------------------

def _yaml_names(text: str) -> list[str] | dict | None:
    try:
        import yaml

        data = yaml.safe_load(text)
        return data.get("names") if isinstance(data, dict) else None
    except ImportError:
        pass
    m = re.search(r"^names\s*:\s*\[(.*?)\]", text, re.M | re.S)
    if m:
        return [s.strip().strip("'\"") for s in m.group(1).split(",") if s.strip()]
    m = re.search(r"^names\s*:\s*\n((?:[ \t]+.*\n?)+)", text, re.M)
    if not m:
        return None
    lines = [ln.strip() for ln in m.group(1).splitlines() if ln.strip()]
    if all(ln.startswith("-") for ln in lines):
        return [ln[1:].strip().strip("'\"") for ln in lines]
    return {int(k): v.strip().strip("'\"") for k, v in (ln.split(":", 1) for ln in lines)}


def read_names(path: str | os.PathLike) -> list[str]:
    """Class names from a darknet `.names` / `classes.txt` (one a line) or a `data.yaml` (`names:`
    as a list or an {id: name} map; missing ids are named `class_<id>`)."""
    path = Path(path)
    text = path.read_text(errors="replace")
    if path.suffix.lower() in (".yaml", ".yml"):
        names = _yaml_names(text)
        if isinstance(names, dict):
            ids = {int(k): str(v) for k, v in names.items()}
            names = [ids.get(i, f"class_{i}") for i in range(max(ids) + 1)] if ids else []
        if not names:
            raise DatasetError(f"{path} has no `names:` list or map")
        return [str(n) for n in names]
    names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not names:
        raise DatasetError(f"class-names file {path} is empty")
    return names


def _find_names(root: Path, layout: DetLayout, image_dirs: list[Path]) -> Path | None:
    if layout.names:
        for cand in (Path(layout.names), root / layout.names):
            if cand.is_file():
                return cand.resolve()
        raise DatasetError(f"class-names file {layout.names} not found (absolute, or relative to the working "
                           f"directory or to {root})")
    places = []
    for d in image_dirs + [root]:
        places += [d, d.parent]
    for d in dict.fromkeys(p for p in places if p == root or root in p.parents):
        for name in NAMES_FILES:
            if (d / name).is_file():
                return d / name
        found = sorted(d.glob("*.names"))
        if found:
            return found[0]
    return None


# -- layouts ------------------------------------------------------------------------------------------

def _coco_files(root: Path) -> list[Path]:
    found = []
    for d in (root, root / "annotations"):
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and {"images", "annotations", "categories"} <= data.keys():
                found.append(p)
    return found


def _locate(root: Path, ann: Path, name: str, by_base: dict[str, str]) -> str | None:
    for base in (root, ann.parent, root / "images", ann.parent.parent / "images"):
        if (base / name).is_file():
            return (base / name).resolve().relative_to(root).as_posix()
    return by_base.get(Path(name).name)


def _read_coco(root: Path, report: dict[str, Any]):
    files = _coco_files(root)
    datas = [json.loads(p.read_text()) for p in files]
    cats = sorted({int(c["id"]): str(c["name"]) for c in datas[0]["categories"]}.items())
    for p, d in zip(files[1:], datas[1:]):
        if sorted({int(c["id"]): str(c["name"]) for c in d["categories"]}.items()) != cats:
            raise DatasetError(f"COCO files {files[0].name} and {p.name} have different categories: "
                               f"point --data at a folder with one of them")
    index = {cid: i for i, (cid, _) in enumerate(cats)}
    by_base = {Path(r).name: r for r in image_files(str(root))}
    items, seen = [], set()
    for ann_path, data in zip(files, datas):
        per_image: dict[Any, list] = {}
        for a in data["annotations"]:
            per_image.setdefault(a.get("image_id"), []).append(a)
        for img in data["images"]:
            rel = _locate(root, ann_path, str(img.get("file_name", "")), by_base)
            if rel is None:
                _count(report, "labels_without_image", str(img.get("file_name")))
                continue
            if rel in seen:
                continue
            seen.add(rel)
            size = (int(img["width"]), int(img["height"])) if img.get("width") and img.get("height") \
                else _size(root / rel, report)
            if size is None:
                continue
            rows = []
            for a in per_image.get(img.get("id"), []):
                bbox = a.get("bbox")
                if not (isinstance(bbox, list) and len(bbox) == 4) or not all(
                        isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
                    _count(report, "malformed", f"{ann_path.name}: annotation {a.get('id')}")
                    continue
                x, y, bw, bh = (float(v) for v in bbox)
                rows.append((x, y, x + bw, y + bh, index.get(int(a.get("category_id", -1)), -1)))
            items.append(_item(rel, rows, *size, len(cats), report))
    layout = {"kind": "coco", "annotations": [p.relative_to(root).as_posix() for p in files],
              "category_ids": [cid for cid, _ in cats]}
    return items, [n for _, n in cats], layout


def _item(rel: str, rows, w: int, h: int, num_classes: int | None, report: dict[str, Any]):
    if not rows:
        _count(report, "background_images", rel)
    boxes, classes = _clean(rows, w, h, num_classes, report)
    return rel, boxes, classes


def _read_nwpu(root: Path, report: dict[str, Any]):
    img_dir, lab_dir = root / NWPU_IMAGES, root / NWPU_LABELS
    images = {Path(r).stem: r for r in image_files(str(img_dir))}
    items, used = [], set()
    for lab in sorted(p for p in lab_dir.rglob("*.txt") if not is_hidden(p.name)):
        stem = lab.relative_to(lab_dir).with_suffix("").as_posix()
        rel = images.get(stem)
        if rel is None:
            _count(report, "labels_without_image", lab.relative_to(root).as_posix())
            continue
        used.add(stem)
        rows, bad = _parse_nwpu(lab.read_text(errors="replace"))
        for line in bad:
            _count(report, "malformed", f"{lab.name}: {line[:60]}")
        size = _size(img_dir / rel, report)
        if size is not None:
            items.append(_item(f"{NWPU_IMAGES}/{rel}", rows, *size, len(NWPU_CLASSES), report))
    extra = [f"{NWPU_IMAGES}/{images[s]}" for s in sorted(images) if s not in used]
    if (root / NWPU_NEGATIVE).is_dir():
        extra += [f"{NWPU_NEGATIVE}/{r}" for r in sorted(image_files(str(root / NWPU_NEGATIVE)))]
    for rel in extra:
        items.append(_item(rel, [], 0, 0, None, report))
    layout = {"kind": "nwpu", "images": NWPU_IMAGES, "labels": NWPU_LABELS,
              "negative": NWPU_NEGATIVE if (root / NWPU_NEGATIVE).is_dir() else None}
    return items, list(NWPU_CLASSES), layout


def _yolo_trees(root: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for here, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        low = {d.lower(): d for d in dirs}
        img = next((low[n] for n in YOLO_IMAGE_DIRS if n in low), None)
        lab = next((low[n] for n in YOLO_LABEL_DIRS if n in low), None)
        if img and lab:
            pairs.append((Path(here) / img, Path(here) / lab))
            dirs[:] = [d for d in dirs if d not in (img, lab)]
    return pairs


def _yolo_pairs(root: Path):
    """(image path, label path or None) per image, and label files without an image."""
    trees = _yolo_trees(root)
    pairs, orphans = [], []
    if trees:
        for img_dir, lab_dir in trees:
            imgs = {Path(r).with_suffix("").as_posix(): img_dir / r for r in image_files(str(img_dir))}
            labs = {p.relative_to(lab_dir).with_suffix("").as_posix(): p for p in lab_dir.rglob("*.txt")
                    if not is_hidden(p.name) and p.name.lower() not in NAMES_FILES}
            pairs += [(imgs[k], labs.get(k)) for k in sorted(imgs)]
            orphans += [labs[k] for k in sorted(labs) if k not in imgs]
        return pairs, orphans, [d for d, _ in trees], "trees"
    txts = [p for p in root.rglob("*.txt") if not is_hidden(p.name) and p.name.lower() not in NAMES_FILES
            and not any(is_hidden(q) for q in p.relative_to(root).parts)]
    beside = {p.with_suffix(""): p for p in txts}
    imgs = [root / r for r in sorted(image_files(str(root)))]
    if not any(p.with_suffix("") in beside for p in imgs):
        return [], [], [], None
    stems = {p.with_suffix("") for p in imgs}
    pairs = [(p, beside.get(p.with_suffix(""))) for p in imgs]
    orphans = [p for k, p in sorted(beside.items()) if k not in stems]
    return pairs, orphans, sorted({p.parent for p in imgs}), "beside"


def _read_yolo(root: Path, layout: DetLayout, found, report: dict[str, Any]):
    pairs, orphans, image_dirs, mode = found
    names_path = _find_names(root, layout, image_dirs)
    names = read_names(names_path) if names_path else None
    for p in orphans:
        _count(report, "labels_without_image", p.relative_to(root).as_posix())
    items, largest = [], -1
    for img, lab in pairs:
        rel = img.relative_to(root).as_posix()
        text = lab.read_text(errors="replace") if lab is not None else ""
        size = _size(img, report) if text.strip() else (0, 0)
        if size is None:
            continue
        rows, bad = _parse_yolo(text, *size)
        for line in bad:
            _count(report, "malformed", f"{lab.name}: {line[:60]}")
        largest = max([largest] + [r[4] for r in rows])
        items.append(_item(rel, rows, *size, len(names) if names else None, report))
    classes = names or [f"class_{i}" for i in range(largest + 1)]
    resolved = {"kind": "yolo", "mode": mode, "images": [d.relative_to(root).as_posix() or "." for d in image_dirs],
                "names": names_path.relative_to(root).as_posix() if names_path and root in names_path.parents
                else (str(names_path) if names_path else None)}
    return items, classes, resolved


def scan_detection(root: str | os.PathLike, layout: DetLayout | None = None) -> DetScan:
    """Find the layout under root, read every label, check every box (see the module docstring)."""
    root = Path(root).resolve()
    layout = layout or DetLayout()
    if not root.is_dir():
        raise DatasetError(f"detection data folder {root} does not exist")
    report, notes = _new_report(), []
    if _coco_files(root):
        items, classes, resolved = _read_coco(root, report)
    elif (root / NWPU_IMAGES).is_dir() and (root / NWPU_LABELS).is_dir():
        items, classes, resolved = _read_nwpu(root, report)
    else:
        found = _yolo_pairs(root)
        if found[3] is None:
            raise DatasetError(f"no detection layout recognised under {root}: expected a COCO json (images, "
                               f"annotations, categories), NWPU VHR-10 ('{NWPU_IMAGES}/' + '{NWPU_LABELS}/'), or "
                               f"YOLO txt labels (images/ + labels/, or a .txt beside each image)")
        items, classes, resolved = _read_yolo(root, layout, found, report)
        if resolved["names"] is None:
            notes.append(f"no class-names file found: classes named class_0..class_{len(classes) - 1}")
    if not items:
        raise DatasetError(f"no images with labels found under {root} ({resolved['kind']} layout)")
    if resolved["kind"] != "yolo" and layout.names:
        notes.append(f"--names {layout.names} ignored: the {resolved['kind']} layout names its classes")
    resolved["options"] = layout.to_dict()
    report["unreadable"] = {Path(p).relative_to(root).as_posix(): e for p, e in sorted(report["unreadable"].items())}
    report["images"] = len(items)
    report["boxes"] = int(sum(len(b) for _, b, _ in items))
    return DetScan(str(root), items, classes, resolved, report, notes)


def _json_item(rel: str, boxes: np.ndarray, classes: np.ndarray) -> list[Any]:
    return [rel, [[round(float(v), 3) for v in b] + [int(c)] for b, c in zip(boxes, classes)]]


def make_detection_split(
    root: str | os.PathLike, layout: DetLayout | None = None, val: float = 0.0, test: float = 0.2, seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """A seeded split by image (80/20 by default, as the paper: no validation part) in the rsedge
    split format; every image is decoded once and unreadable ones are listed under `skipped`."""
    scan = scan_detection(root, layout)
    rootp = Path(scan.root)
    corrupt = find_corrupt(rootp, [(rel, 0) for rel, _, _ in scan.items], progress)
    corrupt.update(scan.report["unreadable"])
    good = {rel: (b, c) for rel, b, c in scan.items if rel not in corrupt}
    if not good:
        raise DatasetError(f"none of the {len(scan.items)} images under {rootp} could be read, "
                           f"e.g. {next(iter(corrupt.items()))}")
    parts = stratified_split([(rel, 0) for rel in sorted(good)], val, test, seed)
    per_class = np.zeros(len(scan.classes), np.int64)
    for _, c in good.values():
        per_class += np.bincount(c, minlength=len(scan.classes))[: len(scan.classes)]
    return {
        "format": SPLIT_FORMAT, "task": "detection", "root": scan.root, "classes": scan.classes,
        "layout": scan.layout, "seed": seed, "fractions": {"val": val, "test": test},
        "counts": {k: len(v) for k, v in parts.items()},
        "boxes": {"total": int(per_class.sum()), "per_class": per_class.tolist()},
        "report": scan.report, "notes": scan.notes,
        "skipped": [{"path": rel, "error": err} for rel, err in sorted(corrupt.items())],
        **{k: [_json_item(rel, *good[rel]) for rel, _ in parts[k]] for k in ("train", "val", "test")},
    }
