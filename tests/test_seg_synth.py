"""trainer/synth_seg.py: the synthetic aerial scene set is deterministic, its masks use only the class
colours (+ the documented unlabelled and stray colours), and its classes differ in colour/texture."""

import hashlib

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from rsedge.runtime.masks import read_colormap, read_mask, read_rgb
from rsedge.trainer.segdata import make_segmentation_split
from rsedge.trainer.synth_seg import (
    CLASSES,
    COLORS,
    STRAY_COLOR,
    UNLABELLED_COLOR,
    write_synthetic_segmentation,
)


def digest(root):
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return root, write_synthetic_segmentation(root, n_images=32, size=128, seed=0, progress=False)


def test_same_seed_same_bytes(tmp_path):
    a = write_synthetic_segmentation(tmp_path / "a", n_images=4, size=64, seed=5, progress=False)
    write_synthetic_segmentation(tmp_path / "b", n_images=4, size=64, seed=5, progress=False)
    write_synthetic_segmentation(tmp_path / "c", n_images=4, size=64, seed=6, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert a["images"] == 4 and a["classes"] == list(CLASSES)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["class_dict.csv", "images", "masks"]


def test_masks_use_only_the_documented_colours(scenes):
    root, summary = scenes
    allowed = {tuple(c) for c in COLORS} | {UNLABELLED_COLOR, STRAY_COLOR}
    seen, counts = set(), np.zeros(len(CLASSES) + 2, np.int64)
    for path in sorted((root / "masks").iterdir()):
        rgb = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
        colours, n = np.unique(rgb, axis=0, return_counts=True)
        for c, k in zip(map(tuple, colours.tolist()), n):
            assert c in allowed, f"{path.name} has colour {c}"
            seen.add(c)
            counts[([tuple(x) for x in COLORS] + [UNLABELLED_COLOR, STRAY_COLOR]).index(c)] += k
    assert seen == allowed  # every class, some no-data corners and some stray pixels
    assert summary["pixels"] == dict(zip(CLASSES, counts[:5].tolist()))
    assert summary["unlabelled_pixels"] == counts[5] and summary["stray_pixels"] == counts[6]
    assert 0 < summary["stray_pixels"] < 200  # a handful per scene, in some scenes


def test_class_dict_and_the_ignore_path(scenes):
    root, summary = scenes
    cmap = read_colormap(str(root / "class_dict.csv"))
    assert cmap.names == list(CLASSES) and cmap.colors == [tuple(c) for c in COLORS]
    assert cmap.ignore_colors == [UNLABELLED_COLOR]
    split = make_segmentation_split(root, progress=False)
    assert split["classes"] == list(CLASSES) and sum(split["counts"].values()) == 32
    px = split["pixels"]
    assert px["unknown"] == summary["stray_pixels"] and px["unknown_colors"] == [list(STRAY_COLOR)]
    assert px["ignored"] == summary["stray_pixels"] + summary["unlabelled_pixels"]


def _features(path):
    """Mean and standard deviation of each channel over 5x5 neighbourhoods."""
    x = read_rgb(str(path)).astype(np.float32) / 255
    win = sliding_window_view(np.pad(x, ((2, 2), (2, 2), (0, 0)), mode="edge"), (5, 5), axis=(0, 1))
    return np.concatenate([win.mean((-1, -2)), win.std((-1, -2))], -1).reshape(-1, 6)


def test_classes_differ_in_colour_and_texture(scenes):
    """A nearest-centroid classifier on local colour statistics, fit on 16 scenes, labels most
    pixels of 16 others right: the set is learnable in a minute, though not a colour lookup."""
    root, _ = scenes
    cmap = read_colormap(str(root / "class_dict.csv"))

    def data(names):
        feats = np.concatenate([_features(root / "images" / n) for n in names])
        labels = np.concatenate([read_mask(str(root / "masks" / n), cmap)[0].ravel() for n in names])
        keep = labels < len(CLASSES)
        return feats[keep], labels[keep]

    names = sorted(p.name for p in (root / "images").iterdir())
    fx, fy = data(names[:16])
    centroids = np.stack([fx[fy == c].mean(0) for c in range(len(CLASSES))])
    tx, ty = data(names[16:])
    pred = ((tx[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == ty).mean() > 0.8
    assert all((pred[ty == c] == c).mean() > 0.5 for c in range(len(CLASSES)))


def test_refuses_a_foreign_folder_and_replaces_its_own(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="did not write"):
        write_synthetic_segmentation(tmp_path, n_images=2, size=32, progress=False)
    out = tmp_path / "set"
    write_synthetic_segmentation(out, n_images=3, size=32, progress=False)
    with pytest.raises(FileExistsError, match="--exist-ok"):
        write_synthetic_segmentation(out, n_images=2, size=32, progress=False)
    write_synthetic_segmentation(out, n_images=2, size=32, progress=False, exist_ok=True)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["scene_000.png", "scene_001.png"]
