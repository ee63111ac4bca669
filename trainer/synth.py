"""A synthetic land-cover dataset the project can make itself.

Real data (EuroSAT, NWPU VHR-10) is for benchmarks; the demo and the tests must run anywhere, so
they use scenes drawn here: each class has its own texture *and* overlapping colours, so a model
must look at structure, not only at the mean colour, yet a small CNN learns it in seconds.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np

CLASSES = ("cropland", "forest", "highway", "residential", "river", "sea_lake")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return y, x


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise: a coarse random grid upsampled bilinearly, in [0, 1]."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    pos = np.linspace(0, cells, size, dtype=np.float32)
    i0 = np.minimum(pos.astype(int), cells - 1)
    t = pos - i0
    rows = coarse[i0] * (1 - t)[:, None] + coarse[i0 + 1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i0 + 1] * t[None, :]


def _mix(base: np.ndarray, other: np.ndarray, w: np.ndarray) -> np.ndarray:
    return base * (1 - w[..., None]) + other * w[..., None]


def _color(rng: np.random.Generator, rgb: tuple[float, float, float], jitter: float = 0.08) -> np.ndarray:
    return np.clip(np.array(rgb, np.float32) + rng.normal(0, jitter, 3).astype(np.float32), 0, 1)


def _vegetation(rng, size):
    return _color(rng, (0.30, 0.45, 0.22), 0.07)


def draw_cropland(rng, size):
    y, x = _grid(size)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(0.08, 0.2)
    u = (x * np.cos(theta) + y * np.sin(theta)) / period
    stripes = (np.floor(u) % 2).astype(np.float32)
    a, b = _vegetation(rng, size), _color(rng, (0.62, 0.58, 0.32))
    img = _mix(np.broadcast_to(a, (size, size, 3)), np.broadcast_to(b, (size, size, 3)), stripes)
    return img + 0.05 * (_smooth_noise(rng, size, 4)[..., None] - 0.5)


def draw_forest(rng, size):
    canopy = _smooth_noise(rng, size, rng.integers(10, 16))
    dark, light = _color(rng, (0.12, 0.28, 0.12), 0.05), _vegetation(rng, size)
    return _mix(np.broadcast_to(dark, (size, size, 3)), np.broadcast_to(light, (size, size, 3)), canopy**2)


def draw_highway(rng, size):
    y, x = _grid(size)
    img = np.broadcast_to(_vegetation(rng, size), (size, size, 3)).copy()
    img = _mix(img, np.broadcast_to(_color(rng, (0.55, 0.5, 0.35)), (size, size, 3)), _smooth_noise(rng, size, 3) * 0.6)
    theta = rng.uniform(0, np.pi)
    offset = rng.uniform(0.3, 0.7)
    dist = np.abs((x - offset) * np.sin(theta) - (y - offset) * np.cos(theta))
    width = rng.uniform(0.04, 0.08)
    road = (dist < width).astype(np.float32)
    return _mix(img, np.broadcast_to(_color(rng, (0.45, 0.45, 0.47), 0.04), (size, size, 3)), road)


def draw_residential(rng, size):
    img = np.broadcast_to(_color(rng, (0.5, 0.5, 0.48)), (size, size, 3)).copy()
    n = rng.integers(6, 14)
    for _ in range(n):
        h, w = rng.integers(size // 10, size // 4, 2)
        r, c = rng.integers(0, size - h), rng.integers(0, size - w)
        roof = _color(rng, (0.6, 0.35, 0.3), 0.15)
        img[r : r + h, c : c + w] = roof
        img[r + h : min(size, r + h + 2), c : c + w] *= 0.5
    return img


def draw_river(rng, size):
    y, x = _grid(size)
    img = np.broadcast_to(_vegetation(rng, size), (size, size, 3)).copy()
    img = _mix(img, np.broadcast_to(_color(rng, (0.2, 0.35, 0.15)), (size, size, 3)), _smooth_noise(rng, size, 6))
    amp, freq, phase = rng.uniform(0.05, 0.15), rng.uniform(1, 3), rng.uniform(0, 2 * np.pi)
    centre = 0.5 + amp * np.sin(2 * np.pi * freq * y + phase)
    width = rng.uniform(0.06, 0.12)
    water = np.clip(1 - np.abs(x - centre) / width, 0, 1) ** 0.5
    if rng.random() < 0.5:
        water = water.T
    return _mix(img, np.broadcast_to(_color(rng, (0.12, 0.22, 0.38)), (size, size, 3)), water)


def draw_sea_lake(rng, size):
    waves = _smooth_noise(rng, size, rng.integers(2, 5))
    deep, shallow = _color(rng, (0.08, 0.18, 0.35)), _color(rng, (0.15, 0.32, 0.42))
    img = _mix(np.broadcast_to(deep, (size, size, 3)), np.broadcast_to(shallow, (size, size, 3)), waves)
    if rng.random() < 0.4:
        y, x = _grid(size)
        edge = np.clip((x + 0.3 * y - rng.uniform(0.9, 1.2)) * 20, 0, 1)
        img = _mix(img, np.broadcast_to(_vegetation(rng, size), (size, size, 3)), edge)
    return img


DRAWERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "cropland": draw_cropland,
    "forest": draw_forest,
    "highway": draw_highway,
    "residential": draw_residential,
    "river": draw_river,
    "sea_lake": draw_sea_lake,
}


def render(cls: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One uint8 HxWx3 scene of class `cls`, with sensor-like noise and illumination change."""
    img = DRAWERS[cls](rng, size).astype(np.float32)
    img = img * rng.uniform(0.8, 1.2) + rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _synth_image(path: Path, cls: str) -> bool:
    return path.is_file() and re.fullmatch(rf"{re.escape(cls)}_\d+\.(png|jpg|jpeg|tif|tiff|bmp)", path.name) is not None


def clear_for_synth(out: Path, exist_ok: bool = False) -> None:
    """New images written among old ones (another seed, size or count) make a dataset nobody
    asked for, so a non-empty folder is refused; with `exist_ok` an earlier `data synth` output
    is deleted first, and a folder holding anything else is still refused (nothing of the user's
    is ever deleted)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    entries = sorted(out.iterdir())
    if not entries:
        return
    foreign = [p for p in entries if not (p.is_dir() and p.name in CLASSES)]
    foreign += [f for p in entries if p.is_dir() and p.name in CLASSES for f in sorted(p.iterdir())
                if not _synth_image(f, p.name)]
    if foreign:
        raise FileExistsError(f"{out} is not empty and holds files `rsedge data synth` did not write "
                              f"(e.g. {foreign[0]}): choose an empty or new --out")
    if not any(any(p.iterdir()) for p in entries):  # empty class folders only
        return
    if not exist_ok:
        raise FileExistsError(f"{out} already holds a synthetic dataset: new images would mix with the old ones; "
                              f"pass --exist-ok to replace it, or choose an empty or new --out")
    for p in entries:
        shutil.rmtree(p)


def make_synthetic_dataset(
    out: str | os.PathLike, per_class: int = 60, size: int = 64, seed: int = 0, fmt: str = "png",
    exist_ok: bool = False,
) -> dict[str, int]:
    """Write `out/<class>/<class>_<n>.<fmt>`; same seed, same bytes. A non-empty `out` is refused
    unless it holds an earlier output of this function and `exist_ok` (then that is replaced)."""
    from PIL import Image

    out = Path(out)
    clear_for_synth(out, exist_ok)
    counts = {}
    for ci, cls in enumerate(CLASSES):
        d = out / cls
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, ci])
        for n in range(per_class):
            Image.fromarray(render(cls, rng, size)).save(d / f"{cls}_{n}.{fmt}")
        counts[cls] = per_class
    return counts


def clear_scene_output(out: Path, is_ours: Callable[[Path], bool], task: str, produced: Sequence[str],
                       exist_ok: bool = False) -> None:
    """`clear_for_synth` for a scene generator (`data synth --task TASK`) whose output is the folders
    and files named in `produced`: a non-empty folder is refused unless `is_ours(out)` and `exist_ok`
    (then they are replaced); nothing of the user's is deleted."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not is_ours(out):
        raise FileExistsError(f"{out} is not empty and holds files `rsedge data synth --task {task}` did not "
                              f"write: choose an empty or new --out")
    if not exist_ok:
        raise FileExistsError(f"{out} already holds a synthetic {task} set: pass --exist-ok to replace it, "
                              f"or choose an empty or new --out")
    for name in produced:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
