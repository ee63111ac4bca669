"""A synthetic aerial object-detection set that the project makes itself.

`write_synthetic_detection` writes `images/NNNN.png`, YOLO labels `labels/NNNN.txt` (one box a
line, `cls cx cy w h` normalized to the image) and `data.yaml` (`names:`) at the root: the layout
`rsedge data synth --task detect` gives the tests and the demo, read by trainer/detdata.py as the
YOLO txt layout. Each scene is textured ground (grass, soil, sand in soft patches), maybe a road
and a few dark trees, with 1 to 6 objects of three classes whose boxes overlap little (IoU < 0.1):

- plane: a bright silhouette, fuselage with swept wings and a tail plane, in one of 8 headings;
- ship: an elongated hull with a pointed bow and a superstructure, any heading, most on a patch
  of water, some on the ground (a dry dock);
- storage tank: a light disc with a darker rim.

Every object casts a shadow away from the scene's one sun, then illumination and sensor noise are
applied. A box is the exact extent of the object's outline (never of its shadow), so it lies
inside the image. Objects are 10 to 40 pixels across in the default 160x160 image: a tiny
detector learns them on a CPU in a minute or two, while shapes (not only brightness) tell the
classes apart, since sand, roads and hulls are light too. Every 20th image (index 10, 30, ...)
has no objects, as a background image (an empty label file).

With `bad_labels` a few deliberately bad label lines are added (a class out of range, a
degenerate box, a malformed line) and a label file whose image does not exist, so `rsedge data
check` shows its bad-label report; the real boxes stay as they are. Same seed, same bytes.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rsedge.runtime.detmetrics import box_iou

from .synth import _color, _grid, _smooth_noise

CLASSES = ("plane", "ship", "storage tank")
PLANE, SHIP, TANK = range(3)
BACKGROUND_EVERY, BACKGROUND_AT = 20, 10
MAX_OVERLAP = 0.1
MIN_SIZE = 64
GROUNDS = ((0.30, 0.45, 0.22), (0.50, 0.40, 0.28), (0.70, 0.64, 0.48))  # grass, soil, sand
PATCH, SHADOW, BODY, DETAIL = range(4)  # drawing phases, in this order over the whole scene
SUPERSAMPLE = 4
BAD_LINES = (("class_out_of_range", f"{len(CLASSES)} 0.5 0.5 0.1 0.1"),
             ("degenerate", "0 0.5 0.5 0.0 0.1"),
             ("malformed", "1 0.5 0.5 0.1"))
_IMAGE_NAME, _LABEL_NAME = re.compile(r"\d{4,}\.png"), re.compile(r"\d{4,}\.txt")

Polygon = np.ndarray  # (V, 2) x, y in pixels


class SceneObject:
    """One object: its class and its layers, (phase, polygons, paint); paint is an RGB colour,
    or a float in (0, 1): how much a shadow darkens what lies under it."""

    def __init__(self, cls: int, layers: list[tuple[int, list[Polygon], Any]]):
        self.cls, self.layers = cls, layers

    def box(self) -> np.ndarray:
        """x1, y1, x2, y2: the extent of the body (shadow and water patch left out)."""
        pts = np.concatenate([p for phase, polys, _ in self.layers if phase >= BODY for p in polys])
        return np.concatenate([pts.min(0), pts.max(0)])

    def moved(self, dx: float, dy: float) -> SceneObject:
        return SceneObject(self.cls, [(ph, [p + (dx, dy) for p in polys], paint) for ph, polys, paint in self.layers])


def _turn(points, theta: float, scale: float) -> Polygon:
    """Local shape points (x forward, y to the side) scaled and rotated by theta about the origin."""
    p = np.asarray(points, np.float64) * scale
    c, s = math.cos(theta), math.sin(theta)
    return np.stack([p[:, 0] * c - p[:, 1] * s, p[:, 0] * s + p[:, 1] * c], 1)


def _mirrored(points) -> list[list[tuple[float, float]]]:
    return [list(points), [(x, -y) for x, y in points]]


def _disc(r: float, n: int = 64) -> Polygon:
    t = np.arange(n) * (2 * np.pi / n)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _shadow(polys: list[Polygon], sun: np.ndarray, length: float, strength: float):
    return (SHADOW, [p + sun * length for p in polys], strength)


def make_plane(rng: np.random.Generator, sun: np.ndarray, max_len: float) -> SceneObject:
    """A plane of length 14..34 px (wing span about the same), nose along one of 8 headings."""
    length = rng.uniform(14, min(34.0, max_len))
    theta = int(rng.integers(0, 8)) * np.pi / 4
    fuselage = [(0.5, 0), (0.42, 0.05), (-0.44, 0.05), (-0.5, 0.02), (-0.5, -0.02), (-0.44, -0.05), (0.42, -0.05)]
    sweep = rng.uniform(0.08, 0.2)
    wing = [(0.12, 0), (0.02 - sweep, 0.48), (-0.08 - sweep, 0.48), (-0.1, 0)]
    tail = [(-0.36, 0), (-0.46, 0.17), (-0.52, 0.17), (-0.47, 0)]
    body = [_turn(p, theta, length) for p in [fuselage] + _mirrored(wing) + _mirrored(tail)]
    paint = _color(rng, (0.9, 0.9, 0.92), 0.03)
    stripe = [_turn([(0.3, 0.02), (-0.3, 0.02), (-0.3, -0.02), (0.3, -0.02)], theta, length)]
    return SceneObject(PLANE, [_shadow(body, sun, max(1.5, 0.1 * length), 0.5), (BODY, body, paint),
                               (DETAIL, stripe, paint * 0.8)])


def make_ship(rng: np.random.Generator, sun: np.ndarray, max_len: float) -> SceneObject:
    """A ship of length 16..40 px, any heading, on a patch of water 7 times in 10."""
    length = rng.uniform(16, min(40.0, max_len))
    theta = rng.uniform(0, 2 * np.pi)
    w = rng.uniform(0.17, 0.27)
    hull = [_turn([(0.5, 0), (0.5 - 0.9 * w, w / 2), (-0.5, w / 2), (-0.5, -w / 2), (0.5 - 0.9 * w, -w / 2)],
                  theta, length)]
    deck = [_turn([(-0.15, 0.3 * w), (-0.4, 0.3 * w), (-0.4, -0.3 * w), (-0.15, -0.3 * w)], theta, length)]
    paint = _color(rng, ((0.85, 0.85, 0.86), (0.55, 0.57, 0.6), (0.62, 0.28, 0.22))[int(rng.integers(0, 3))], 0.03)
    layers = [_shadow(hull, sun, 1.5, 0.45), (BODY, hull, paint), (DETAIL, deck, _color(rng, (0.92, 0.9, 0.85), 0.03))]
    if rng.random() < 0.7:
        half = w / 2 + rng.uniform(0.25, 0.5)
        t = np.arange(48) * (2 * np.pi / 48)
        rounded = np.stack([0.8 * np.sign(np.cos(t)) * np.abs(np.cos(t)) ** 0.4,
                            half * np.sign(np.sin(t)) * np.abs(np.sin(t)) ** 0.4], 1)
        water = _turn(rounded, theta, length)
        layers.insert(0, (PATCH, [water], _color(rng, (0.10, 0.20, 0.34), 0.03)))
    return SceneObject(SHIP, layers)


def make_tank(rng: np.random.Generator, sun: np.ndarray, max_len: float) -> SceneObject:
    """A storage tank 10..28 px across: a light disc with a darker rim and a round shadow."""
    r = rng.uniform(5, min(14.0, max_len / 2))
    paint = _color(rng, (0.82, 0.82, 0.8), 0.025)
    return SceneObject(TANK, [_shadow([_disc(r)], sun, 0.4 * r, 0.55), (BODY, [_disc(r)], paint * 0.7),
                              (DETAIL, [_disc(0.8 * r)], paint)])


MAKERS: tuple[Callable[[np.random.Generator, np.ndarray, float], SceneObject], ...] = (make_plane, make_ship, make_tank)


def _ground(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = (_color(rng, GROUNDS[int(rng.integers(0, 3))], 0.04) for _ in range(2))
    mix = _smooth_noise(rng, size, int(rng.integers(2, 5)))[..., None]
    grain = _smooth_noise(rng, size, int(rng.integers(12, 24)))[..., None]
    img = (a * (1 - mix) + b * mix) * (0.9 + 0.2 * grain)
    return img + rng.normal(0, 0.025, (size, size, 3)).astype(np.float32)


def _road(rng: np.random.Generator, img: np.ndarray, size: int) -> None:
    if rng.random() > 0.4:
        return
    y, x = (v * size for v in _grid(size))
    theta, (cy, cx) = rng.uniform(0, np.pi), rng.uniform(0.2, 0.8, 2) * size
    along = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
    across = np.abs(-(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta))
    road = across < rng.uniform(2.5, 5)
    img[road] = _color(rng, (0.45, 0.45, 0.47), 0.03)
    img[(across < 0.6) & (np.floor(along / 4) % 2 == 0)] = 0.8


def _alpha(polys: list[Polygon], size: int) -> np.ndarray:
    """Coverage (size, size) in [0, 1] of the polygons, antialiased by supersampling; pixel (i, j)
    covers [j, j+1) x [i, i+1), so a box's x2 - x1 is its width in pixels."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for p in polys:
        draw.polygon([(float(x) * SUPERSAMPLE, float(y) * SUPERSAMPLE) for x, y in p], fill=255)
    return np.asarray(canvas.resize((size, size), Image.BOX), np.float32)[..., None] / 255.0


def _paint(img: np.ndarray, objects: list[SceneObject], size: int) -> None:
    for phase in (PATCH, SHADOW, BODY, DETAIL):
        for obj in objects:
            for ph, polys, paint in obj.layers:
                if ph != phase:
                    continue
                a = _alpha(polys, size)
                if ph == SHADOW:
                    img *= 1 - paint * a
                else:
                    img[:] = img * (1 - a) + np.asarray(paint, np.float32) * a


def _place(rng: np.random.Generator, n: int, size: int, sun: np.ndarray) -> list[SceneObject]:
    """Up to n objects of random classes, wholly inside the image, box IoU < MAX_OVERLAP pairwise
    (an object that finds no free place in 30 tries is left out)."""
    placed: list[SceneObject] = []
    boxes = np.zeros((0, 4))
    max_len = min(40.0, size / 4)
    for _ in range(n):
        maker = MAKERS[int(rng.integers(0, len(MAKERS)))]
        for _ in range(30):
            obj = maker(rng, sun, max_len)
            x1, y1, x2, y2 = obj.box()
            if x2 - x1 > size - 2 or y2 - y1 > size - 2:
                continue
            obj = obj.moved(rng.uniform(1 - x1, size - 1 - x2), rng.uniform(1 - y1, size - 1 - y2))
            box = obj.box()[None]
            if len(boxes) and box_iou(box, boxes).max() >= MAX_OVERLAP:
                continue
            placed.append(obj)
            boxes = np.vstack([boxes, box])
            break
    return placed


def render_detection_scene(rng: np.random.Generator, size: int = 160, n_objects: int | None = None
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HxWx3 uint8 image, boxes (K, 4) float64 xyxy pixels, classes (K,) int64); n_objects None =
    1..6 at random, 0 = a background scene."""
    img = _ground(rng, size)
    _road(rng, img, size)
    trees = [_disc(rng.uniform(1.5, 4.0)) + rng.uniform(0, size, 2) for _ in range(int(rng.integers(0, 7)))]
    if trees:
        _paint(img, [SceneObject(-1, [(BODY, trees, _color(rng, (0.12, 0.24, 0.10), 0.02))])], size)
    angle = rng.uniform(0, 2 * np.pi)
    sun = np.array([math.cos(angle), math.sin(angle)])
    objects = _place(rng, int(rng.integers(1, 7)) if n_objects is None else n_objects, size, sun)
    _paint(img, objects, size)
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 0.02, img.shape).astype(np.float32)
    boxes = np.array([o.box() for o in objects], np.float64).reshape(-1, 4)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), boxes, np.array([o.cls for o in objects], np.int64)


def yolo_lines(boxes: np.ndarray, classes: np.ndarray, size: int) -> list[str]:
    """`cls cx cy w h` normalized to a square image of side `size`."""
    return [f"{int(c)} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / size:.6f} "
            f"{(y2 - y1) / size:.6f}" for (x1, y1, x2, y2), c in zip(boxes, classes)]


def _is_ours(out: Path) -> bool:
    if not {p.name for p in out.iterdir()} <= {"images", "labels", "data.yaml"}:
        return False
    return all(pattern.fullmatch(f.name) for d, pattern in (("images", _IMAGE_NAME), ("labels", _LABEL_NAME))
               if (out / d).is_dir() for f in (out / d).iterdir())


def clear_for_synth_det(out: Path, exist_ok: bool = False) -> None:
    """As `synth.clear_for_synth`: a non-empty folder is refused, unless it holds an earlier output
    of this function and `exist_ok` (then it is replaced); nothing of the user's is deleted."""
    from .synth import clear_scene_output

    clear_scene_output(out, _is_ours, "detect", ("images", "labels", "data.yaml"), exist_ok)


def write_data_yaml(path: Path) -> None:
    names = "".join(f"  - {n}\n" for n in CLASSES)
    path.write_text(f"# rsedge data synth --task detect: synthetic aerial scenes, YOLO txt labels\n"
                    f"nc: {len(CLASSES)}\nnames:\n{names}")


def _add_bad_labels(out: Path, n_images: int) -> dict[str, int]:
    """One bad line of each kind appended to the label files of the first images (never a
    background one), and a label file for an image that does not exist."""
    counts = {}
    for i, (kind, line) in enumerate(BAD_LINES):
        with open(out / "labels" / f"{i % n_images:04d}.txt", "a") as f:
            f.write(line + "\n")
        counts[kind] = 1
    (out / "labels" / f"{n_images:04d}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    counts["labels_without_image"] = 1
    return counts


def write_synthetic_detection(
    out: str | os.PathLike, n_images: int = 240, size: int = 160, seed: int = 0, progress: bool = True,
    exist_ok: bool = False, bad_labels: bool = False,
) -> dict[str, Any]:
    """Write the scene set (see the module docstring); returns a summary: path, images, size, seed,
    classes, boxes (total and per class), background images, and the bad labels added."""
    from PIL import Image

    if n_images < 1 or size < MIN_SIZE:
        raise ValueError(f"need at least one image of at least {MIN_SIZE}x{MIN_SIZE}, got {n_images} of {size}x{size}")
    out = Path(out)
    clear_for_synth_det(out, exist_ok)
    for d in ("images", "labels"):
        (out / d).mkdir(parents=True, exist_ok=True)
    write_data_yaml(out / "data.yaml")
    per_class, background = np.zeros(len(CLASSES), np.int64), 0
    it = range(n_images)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="synthetic detection scenes", unit="img", leave=False)
    for i in it:
        empty = i % BACKGROUND_EVERY == BACKGROUND_AT
        image, boxes, classes = render_detection_scene(np.random.default_rng([seed, i]), size, 0 if empty else None)
        Image.fromarray(image).save(out / "images" / f"{i:04d}.png")
        (out / "labels" / f"{i:04d}.txt").write_text("".join(line + "\n" for line in yolo_lines(boxes, classes, size)))
        per_class += np.bincount(classes, minlength=len(CLASSES))
        background += int(len(classes) == 0)
    bad = _add_bad_labels(out, n_images) if bad_labels else {}
    return {
        "path": str(out), "images": n_images, "size": size, "seed": seed, "classes": list(CLASSES),
        "boxes": int(per_class.sum()), "per_class": dict(zip(CLASSES, per_class.tolist())),
        "background_images": background, "bad_labels": bad,
    }
