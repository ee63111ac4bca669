"""A synthetic aerial scene set for segmentation that the project makes itself.

`write_synthetic_segmentation` writes `images/scene_NNN.png`, colour masks `masks/scene_NNN.png`
and `class_dict.csv` (`name,r,g,b`, the CamVid / DeepGlobe convention) at the root: the layout
`rsedge data synth --task segment` gives the tests and the demo. Each scene is bare soil with
striped field rectangles, straight road bands, water blobs and small bright buildings with dark
shadows (a shadow keeps the label of what it falls on), under a random illumination and sensor
noise. Every class has its own colour *and* texture, so a small model segments it well on a CPU
in about a minute, while shadows, stripes and noise keep it from being a per-pixel colour lookup.

The ignore path is exercised twice, on purpose:
- `class_dict.csv` has an `unlabelled` row (black, UNLABELLED_COLOR): about a quarter of the
  scenes have a black no-data corner, as orthophotos do at their edges, masked unlabelled;
- a few scenes carry a handful of mask pixels of STRAY_COLOR, a colour in no row (annotation
  noise): they must become the ignore label and be counted, never a class.
Same seed, same bytes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .synth import _color, _grid, _smooth_noise

CLASSES = ("background", "field", "road", "building", "water")
COLORS = ((128, 96, 64), (0, 160, 0), (160, 160, 160), (220, 40, 40), (0, 80, 220))
UNLABELLED = "unlabelled"
UNLABELLED_COLOR = (0, 0, 0)
STRAY_COLOR = (255, 0, 255)
BACKGROUND, FIELD, ROAD, BUILDING, WATER = range(5)
NODATA = -1
STRAY = -2


def _soil(rng: np.random.Generator, size: int) -> np.ndarray:
    base = _color(rng, (0.62, 0.50, 0.36), 0.05)
    light = _smooth_noise(rng, size, int(rng.integers(3, 6)))[..., None]
    return base * (0.85 + 0.3 * light) + rng.normal(0, 0.035, (size, size, 3)).astype(np.float32)


def _fields(rng, img, label, size):
    y, x = _grid(size)
    for _ in range(int(rng.integers(1, 4))):
        h, w = (rng.uniform(0.2, 0.5, 2) * size).astype(int)
        top, left = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
        theta, period = rng.uniform(0, np.pi), rng.uniform(4, 9) / size
        stripes = (np.floor((x * np.cos(theta) + y * np.sin(theta)) / period) % 2)[..., None]
        a, b = _color(rng, (0.22, 0.45, 0.18), 0.04), _color(rng, (0.36, 0.58, 0.24), 0.04)
        crop = a * (1 - stripes) + b * stripes
        img[top:top + h, left:left + w] = crop[top:top + h, left:left + w]
        label[top:top + h, left:left + w] = FIELD


def _water(rng, img, label, size):
    if rng.random() > 0.6:
        return
    y, x = _grid(size)
    cy, cx = rng.uniform(0.2, 0.8, 2)
    a, b = rng.uniform(0.12, 0.3, 2)
    wobble = _smooth_noise(rng, size, 4) - 0.5
    blob = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + 0.9 * wobble < 1
    waves = 0.04 * np.sin(2 * np.pi * (x + 0.5 * y) * rng.uniform(8, 14))[..., None]
    water = _color(rng, (0.10, 0.20, 0.36), 0.03) + waves
    img[blob] = np.broadcast_to(water, img.shape)[blob]
    label[blob] = WATER


def _roads(rng, img, label, size):
    y, x = (v * size for v in _grid(size))
    for _ in range(int(rng.integers(1, 3))):
        theta = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(0.25, 0.75, 2) * size
        along = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
        across = np.abs(-(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta))
        width = rng.uniform(2.5, 5)
        road = across < width
        asphalt = _color(rng, (0.42, 0.42, 0.44), 0.03) + rng.normal(0, 0.02, img.shape).astype(np.float32)
        img[road] = asphalt[road]
        dashes = (across < 0.6) & (np.floor(along / 4) % 2 == 0)
        img[dashes] = 0.85
        label[road] = ROAD


def _buildings(rng, img, label, size):
    for _ in range(int(rng.integers(2, 9))):
        h, w = rng.integers(5, 15, 2)
        top, left = int(rng.integers(0, size - h - 3)), int(rng.integers(0, size - w - 3))
        img[top + 3:top + h + 3, left + 3:left + w + 3] *= 0.45  # the shadow, down and right
        roof = _color(rng, ((0.88, 0.87, 0.84), (0.78, 0.36, 0.30), (0.75, 0.76, 0.78))[int(rng.integers(0, 3))], 0.03)
        img[top:top + h, left:left + w] = roof
        img[top:top + h, left] *= 1.08  # a lit edge
        label[top:top + h, left:left + w] = BUILDING


def _nodata_and_stray(rng, img, label, size):
    if rng.random() < 0.25:
        y, x = _grid(size)
        corner = [x + y, (1 - x) + y, x + (1 - y), (1 - x) + (1 - y)][int(rng.integers(0, 4))]
        cut = corner < rng.uniform(0.15, 0.35)
        img[cut] = 0.0
        label[cut] = NODATA
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 5))):
            label[int(rng.integers(0, size)), int(rng.integers(0, size))] = STRAY


def render_scene(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 image, HxW label map: class index, NODATA for unlabelled, STRAY for a pixel
    of a colour in no class)."""
    img = _soil(rng, size)
    label = np.full((size, size), BACKGROUND, np.int64)
    for draw in (_fields, _water, _roads, _buildings):
        draw(rng, img, label, size)
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 0.02, img.shape).astype(np.float32)
    _nodata_and_stray(rng, img, label, size)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


def colour_mask(label: np.ndarray) -> np.ndarray:
    palette = np.array(list(COLORS) + [STRAY_COLOR, UNLABELLED_COLOR], np.uint8)  # index -2 stray, -1 no-data
    return palette[label]


def _is_ours(out: Path) -> bool:
    names = {p.name for p in out.iterdir()}
    if not names <= {"images", "masks", "class_dict.csv"}:
        return False
    return all(f.name.startswith("scene_") and f.suffix == ".png" for d in ("images", "masks") if (out / d).is_dir()
               for f in (out / d).iterdir())


def clear_for_synth_seg(out: Path, exist_ok: bool = False) -> None:
    """As `synth.clear_for_synth`: a non-empty folder is refused, unless it holds an earlier output
    of this function and `exist_ok` (then it is replaced); nothing of the user's is deleted."""
    from .synth import clear_scene_output

    clear_scene_output(out, _is_ours, "segment", ("images", "masks", "class_dict.csv"), exist_ok)


def write_class_dict(path: Path) -> None:
    rows = ["name,r,g,b"] + [f"{n},{r},{g},{b}" for n, (r, g, b) in zip(CLASSES, COLORS)]
    rows.append("{},{},{},{}".format(UNLABELLED, *UNLABELLED_COLOR))
    path.write_text("\n".join(rows) + "\n")


def write_synthetic_segmentation(
    out: str | os.PathLike, n_images: int = 48, size: int = 128, seed: int = 0, progress: bool = True,
    exist_ok: bool = False,
) -> dict[str, Any]:
    """Write the scene set (see the module docstring); returns a summary: path, images, size,
    seed, classes, colours, pixels per class, unlabelled and stray pixels."""
    from PIL import Image

    if n_images < 1 or size < 32:
        raise ValueError(f"need at least one image of at least 32x32, got {n_images} of {size}x{size}")
    out = Path(out)
    clear_for_synth_seg(out, exist_ok)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    write_class_dict(out / "class_dict.csv")
    counts = np.zeros(len(CLASSES) + 2, np.int64)  # classes, stray, no-data
    it = range(n_images)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="synthetic scenes", unit="img", leave=False)
    for i in it:
        image, label = render_scene(np.random.default_rng([seed, i]), size)
        Image.fromarray(image).save(out / "images" / f"scene_{i:03d}.png")
        Image.fromarray(colour_mask(label)).save(out / "masks" / f"scene_{i:03d}.png")
        counts += np.bincount((label % (len(CLASSES) + 2)).ravel(), minlength=len(CLASSES) + 2)
    return {
        "path": str(out), "images": n_images, "size": size, "seed": seed, "classes": list(CLASSES),
        "colors": [list(c) for c in COLORS], "pixels": dict(zip(CLASSES, counts[: len(CLASSES)].tolist())),
        "unlabelled_pixels": int(counts[-1]), "stray_pixels": int(counts[-2]), "stray_color": list(STRAY_COLOR),
    }
