"""trainer/segdata.py: segmentation layouts, the split by image, the patch (training) and whole-image
(evaluation) datasets with joint augmentation."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsedge.runtime.tiling import window_grid
from rsedge.trainer import segdata
from rsedge.trainer.datasets import DatasetError, SkipUnreadable, Unreadable, UnreadableImage, split_digest
from rsedge.trainer.segdata import (
    RandomRot90,
    SegLayout,
    SegmentationImages,
    SegmentationPatches,
    TileGroupedSampler,
    check_segmentation_split,
    collate_tiles,
    count_ignored,
    joint_transform,
    make_segmentation_split,
    resolve_segmentation_split,
    scan_segmentation,
)

CSV = "name,r,g,b\nred,200,0,0\ngreen,0,200,0\nblue,0,0,200\nunlabelled,0,0,0\n"
PALETTE = np.array([(200, 0, 0), (0, 200, 0), (0, 0, 200)], np.uint8)
NORM = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


def labels(h, w, seed, n=3):
    """Blocky class labels (4x4 blocks), every class present."""
    rng = np.random.default_rng(seed)
    lab = np.kron(rng.integers(0, n, ((h + 3) // 4, (w + 3) // 4)), np.ones((4, 4), np.int64))[:h, :w]
    lab.flat[:n] = np.arange(n)
    return lab


def write_pair(img_path, mask_path, h=24, w=32, seed=0, kind="color", ext=".png"):
    img_path, mask_path = Path(img_path), Path(mask_path)
    img_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1000)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_path.with_suffix(ext))
    lab = labels(h, w, seed)
    Image.fromarray(PALETTE[lab] if kind == "color" else lab.astype(np.uint8)).save(mask_path)
    return lab


def tiles_set(root, per_tile=3, tiles=2):
    """The Dubai layout: ROOT/set/Tile N/{images,masks}, class_dict.csv at the root."""
    for t in range(1, tiles + 1):
        for i in range(per_tile):
            base = root / "set" / f"Tile {t}"
            write_pair(base / "images" / f"image_part_{i:03d}.jpg", base / "masks" / f"image_part_{i:03d}.png",
                       seed=10 * t + i, ext=".jpg")
    (root / "class_dict.csv").write_text(CSV)
    return root


def meta_of(split, size=(16, 16), overlap=4):
    return {"task": "segmentation", "classes": split["classes"], "colors": split["colors"],
            "ignore_index": split["ignore_index"], "layout": split["layout"], "input_size": list(size),
            "overlap": overlap, "normalization": NORM}


# -- layouts ------------------------------------------------------------------------------------

def test_nested_tiles_and_class_dict_wins_over_json(tmp_path):
    tiles_set(tmp_path)
    (tmp_path / "classes.json").write_text('{"a": [1, 2, 3]}')  # wrong colours, as the Dubai set's
    scan = scan_segmentation(tmp_path)
    assert len(scan.pairs) == 6 and scan.pairs == sorted(scan.pairs)
    assert scan.pairs[0] == ("set/Tile 1/images/image_part_000.jpg", "set/Tile 1/masks/image_part_000.png")
    assert scan.classes == ["red", "green", "blue"] and scan.colors == PALETTE.tolist()
    assert scan.layout["colormap"] == str((tmp_path / "class_dict.csv").resolve())
    assert scan.layout["mask_kind"] == "color" and scan.layout["folders"] == 2
    assert scan.layout["images"] == ["images"] and scan.layout["masks"] == ["masks"]
    assert scan.layout["ignore_colors"] == [[0, 0, 0]] and scan.presplit is None
    assert any("class_dict.csv used, classes.json ignored" in n for n in scan.notes)


def test_json_colormap_at_the_root(tmp_path):
    for i in range(3):
        write_pair(tmp_path / "images" / f"{i}.png", tmp_path / "masks" / f"{i}.png", seed=i)
    (tmp_path / "classes.json").write_text('{"classes": [{"name": "r", "color": [200, 0, 0]}, '
                                           '{"name": "g", "color": [0, 200, 0]}, {"name": "b", "color": "#0000c8"}]}')
    assert scan_segmentation(tmp_path).classes == ["r", "g", "b"]


def test_index_masks_in_labels_folder(tmp_path):
    for i in range(3):
        lab = write_pair(tmp_path / "images" / f"a{i}.png", tmp_path / "labels" / f"a{i}.png", seed=i, kind="index")
    scan = scan_segmentation(tmp_path)
    assert scan.layout["mask_kind"] == "index" and scan.colors is None and scan.layout["colormap"] is None
    assert scan.classes == [f"class_{i}" for i in range(int(lab.max()) + 1)]


def test_pascal_voc_layout_with_boundary_255(tmp_path):
    for i in range(3):
        write_pair(tmp_path / "JPEGImages" / f"2007_{i}.jpg", tmp_path / "SegmentationClass" / f"2007_{i}.png",
                   seed=i, kind="index", ext=".jpg")
        arr = np.asarray(Image.open(tmp_path / "SegmentationClass" / f"2007_{i}.png")).copy()
        arr[0, :] = 255
        arr[1, 1] = 5
        out = Image.frombytes("P", arr.shape[::-1], arr.tobytes())
        out.putpalette([v for k in range(256) for v in (k, 255 - k, k // 2)])
        out.save(tmp_path / "SegmentationClass" / f"2007_{i}.png")
    (tmp_path / "JPEGImages" / "2007_9.jpg").write_bytes((tmp_path / "JPEGImages" / "2007_0.jpg").read_bytes())
    split = make_segmentation_split(tmp_path, progress=False)
    assert split["classes"] == [f"class_{i}" for i in range(6)]
    assert split["layout"]["images"] == ["JPEGImages"] and split["layout"]["masks"] == ["SegmentationClass"]
    assert split["unmatched"] == {"images": 1, "masks": 0, "examples": ["JPEGImages/2007_9.jpg"]}
    assert split["pixels"]["ignored"] == 3 * 32


def test_named_folders_and_what_was_looked_for(tmp_path):
    for t in ("a", "b"):
        for i in range(2):
            write_pair(tmp_path / t / "rgb_tiles" / f"{i}.png", tmp_path / t / "gt_png" / f"{i}.png", seed=i)
    (tmp_path / "class_dict.csv").write_text(CSV)
    with pytest.raises(DatasetError, match="no image/mask pairs .* --images NAME --masks NAME"):
        scan_segmentation(tmp_path)
    scan = scan_segmentation(tmp_path, SegLayout(images="rgb_tiles", masks="gt_png"))
    assert len(scan.pairs) == 4 and scan.layout["options"]["masks"] == "gt_png"
    assert scan.pairs[0] == ("a/rgb_tiles/0.png", "a/gt_png/0.png")


def test_folders_given_as_paths_need_not_be_siblings(tmp_path):
    for i in range(2):
        write_pair(tmp_path / "data" / "x" / f"{i}.png", tmp_path / "annot" / "y" / f"{i}.png", seed=i)
    (tmp_path / "class_dict.csv").write_text(CSV)
    scan = scan_segmentation(tmp_path, SegLayout(images="data/x", masks="annot/y"))
    assert scan.pairs == [("data/x/0.png", "annot/y/0.png"), ("data/x/1.png", "annot/y/1.png")]


def test_missing_masks_and_images_are_counted(tmp_path):
    tiles_set(tmp_path)
    os.remove(tmp_path / "set" / "Tile 1" / "masks" / "image_part_001.png")
    os.remove(tmp_path / "set" / "Tile 2" / "images" / "image_part_002.jpg")
    scan = scan_segmentation(tmp_path)
    assert len(scan.pairs) == 4
    assert scan.unmatched_images == ["set/Tile 1/images/image_part_001.jpg"]
    assert scan.unmatched_masks == ["set/Tile 2/masks/image_part_002.png"]
    assert any(n.startswith("1 image(s) without a mask") for n in scan.notes)


def test_suffixes_match_stems(tmp_path):
    for i in range(2):
        write_pair(tmp_path / "images" / f"{i}_sat.jpg", tmp_path / "masks" / f"{i}_mask.png", seed=i, ext=".jpg")
    (tmp_path / "class_dict.csv").write_text(CSV)
    assert scan_segmentation(tmp_path).pairs == [("images/0_sat.jpg", "masks/0_mask.png"),
                                                 ("images/1_sat.jpg", "masks/1_mask.png")]


def test_no_pairs_and_duplicate_stems_are_clear_errors(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "a.png")
    with pytest.raises(DatasetError, match="no image/mask pairs under"):
        scan_segmentation(tmp_path)
    write_pair(tmp_path / "images" / "b.png", tmp_path / "masks" / "b.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "b.jpg")
    with pytest.raises(DatasetError, match="two files with the stem 'b'"):
        scan_segmentation(tmp_path)


def test_colour_masks_without_colormap(tmp_path):
    for i in range(2):
        write_pair(tmp_path / "images" / f"{i}.png", tmp_path / "masks" / f"{i}.png", seed=i)
    with pytest.raises(DatasetError, match="is a colour mask: give a colour map"):
        make_segmentation_split(tmp_path, progress=False)


def test_wrong_colormap_is_refused(tmp_path):
    tiles_set(tmp_path)
    (tmp_path / "class_dict.csv").write_text("name,r,g,b\na,1,2,3\nb,4,5,6\n")
    with pytest.raises(DatasetError, match=r"100% of the mask pixels have colours in no class .*--colormap"):
        make_segmentation_split(tmp_path, progress=False)


def test_binary_0_255_masks_need_a_colormap(tmp_path):
    for i in range(3):
        write_pair(tmp_path / "images" / f"{i}.png", tmp_path / "masks" / f"{i}.png", seed=i, kind="index")
        lab = (np.asarray(Image.open(tmp_path / "masks" / f"{i}.png")) > 0).astype(np.uint8) * 255
        Image.fromarray(lab).save(tmp_path / "masks" / f"{i}.png")
    with pytest.raises(DatasetError, match="0/255 binary masks"):
        make_segmentation_split(tmp_path, progress=False)
    (tmp_path / "bw.csv").write_text("name,r,g,b\nbackground,0,0,0\nbuilding,255,255,255\n")
    split = make_segmentation_split(tmp_path, SegLayout(colormap="bw.csv"), progress=False)
    assert split["classes"] == ["background", "building"] and split["pixels"]["ignored"] == 0


def test_presplit_folders_are_respected(tmp_path):
    for part, n in (("train", 4), ("val", 2), ("test", 2)):
        for i in range(n):
            write_pair(tmp_path / part / "images" / f"{part}{i}.png", tmp_path / part / "masks" / f"{part}{i}.png",
                       seed=i)
    (tmp_path / "class_dict.csv").write_text(CSV)
    split = make_segmentation_split(tmp_path, progress=False)
    assert split["presplit"] is True and split["counts"] == {"train": 4, "val": 2, "test": 2}
    assert all(img.startswith(part + "/") for part in ("train", "val", "test") for img, _ in split[part])
    assert split["notes"] == []


def test_presplit_missing_part_is_carved_from_train(tmp_path):
    for part, n in (("training", 10), ("validation", 2)):
        for i in range(n):
            write_pair(tmp_path / "images" / part / f"{i}.png", tmp_path / "masks" / part / f"{i}.png", seed=i)
    (tmp_path / "class_dict.csv").write_text(CSV)
    split = make_segmentation_split(tmp_path, val=0.1, test=0.2, progress=False)
    assert split["presplit"] is True and split["counts"] == {"train": 8, "val": 2, "test": 2}
    assert all(img.startswith("images/validation/") for img, _ in split["val"])
    assert all(img.startswith("images/training/") for img, _ in split["test"])
    assert any("no published test part: 2 image(s)" in n for n in split["notes"])


def test_partly_presplit_set_is_split_whole(tmp_path):
    for i in range(3):
        write_pair(tmp_path / "train" / "images" / f"{i}.png", tmp_path / "train" / "masks" / f"{i}.png", seed=i)
        write_pair(tmp_path / "extra" / "images" / f"{i}.png", tmp_path / "extra" / "masks" / f"{i}.png", seed=i)
    (tmp_path / "class_dict.csv").write_text(CSV)
    split = make_segmentation_split(tmp_path, progress=False)
    assert split["presplit"] is False and sum(split["counts"].values()) == 6
    assert any("whole set is split" in n for n in split["notes"])


# -- the split ----------------------------------------------------------------------------------

def test_split_is_seeded_by_image_and_every_part_gets_one(tmp_path):
    tiles_set(tmp_path, per_tile=5)
    a = make_segmentation_split(tmp_path, seed=3, progress=False)
    b = make_segmentation_split(tmp_path, seed=3, progress=False)
    c = make_segmentation_split(tmp_path, seed=4, progress=False)
    assert a == b and split_digest(a) == split_digest(b) and split_digest(a) != split_digest(c)
    parts = [set(map(tuple, a[k])) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == 10 and len(set.union(*parts)) == 10
    assert a["counts"] == {"train": 7, "val": 1, "test": 2}
    assert a["task"] == "segmentation" and a["format"] == "rsedge-split/1" and a["ignore_index"] == 255
    assert a["classes"] == ["red", "green", "blue"] and a["fractions"] == {"val": 0.1, "test": 0.2}
    small = tmp_path / "small"
    for i in range(3):
        write_pair(small / "images" / f"{i}.png", small / "masks" / f"{i}.png", seed=i)
    (small / "class_dict.csv").write_text(CSV)
    assert make_segmentation_split(small, val=0.01, test=0.01, progress=False)["counts"] == {
        "train": 1, "val": 1, "test": 1}


def test_unreadable_and_mismatched_pairs_are_skipped_and_listed(tmp_path):
    tiles_set(tmp_path)
    (tmp_path / "set" / "Tile 1" / "images" / "image_part_000.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(PALETTE[labels(10, 10, 0)]).save(tmp_path / "set" / "Tile 2" / "masks" / "image_part_001.png")
    split = make_segmentation_split(tmp_path, progress=False)
    assert sum(split["counts"].values()) == 4
    errors = {s["path"]: s["error"] for s in split["skipped"]}
    assert errors["set/Tile 1/images/image_part_000.jpg"].startswith("image: ")
    assert errors["set/Tile 2/images/image_part_001.jpg"] == "mask is 10x10 but the image is 32x24"


def test_pixel_counts_in_the_split(tmp_path):
    tiles_set(tmp_path, per_tile=2, tiles=1)
    mask_path = tmp_path / "set" / "Tile 1" / "masks" / "image_part_000.png"
    rgb = np.asarray(Image.open(mask_path)).copy()
    rgb[0, :3] = (0, 0, 0)  # unlabelled
    rgb[1, :2] = (7, 7, 7)  # in no class
    Image.fromarray(rgb).save(mask_path)
    split = make_segmentation_split(tmp_path, progress=False)
    px = split["pixels"]
    assert px["total"] == 2 * 24 * 32 and px["ignored"] == 5 and px["unknown"] == 2
    assert px["unknown_colors"] == [[7, 7, 7]] and sum(px["per_class"]) == px["total"] - 5


def test_check_and_resolve_split(tmp_path):
    data, run = tiles_set(tmp_path / "d"), tmp_path / "run"
    run.mkdir()
    split = resolve_segmentation_split(data, run, SegLayout(), progress=False)
    assert (run / "split.json").is_file()
    assert resolve_segmentation_split(data, run, progress=False) == split
    with pytest.raises(DatasetError, match="was made with layout options"):
        resolve_segmentation_split(data, run, SegLayout(masks="labels"), progress=False)
    check_segmentation_split(split)
    gone = split["val"][0][1]
    os.remove(Path(split["root"]) / gone)
    with pytest.raises(DatasetError, match=f"1 file\\(s\\) of the split are gone from .*{gone}"):
        check_segmentation_split(split)


def test_layout_options_round_trip():
    layout = SegLayout(images="rgb", masks=None, colormap="/x/c.csv")
    assert SegLayout.from_dict(layout.to_dict()) == layout
    assert SegLayout.from_dict({"options": layout.to_dict(), "mask_kind": "color"}) == layout
    assert SegLayout.from_dict(None) == SegLayout()


# -- datasets -----------------------------------------------------------------------------------

def big_tile_set(root, h=50, w=70):
    lab = write_pair(root / "images" / "big.png", root / "masks" / "big.png", h=h, w=w, seed=1)
    write_pair(root / "images" / "small.png", root / "masks" / "small.png", h=11, w=9, seed=2)
    (root / "class_dict.csv").write_text(CSV)
    split = make_segmentation_split(root, val=0, test=0, progress=False)
    return split, lab


def test_patches_cover_the_tile(tmp_path):
    split, lab = big_tile_set(tmp_path)
    ds = SegmentationPatches(split["root"], [["images/big.png", "masks/big.png"]], meta_of(split, (16, 24), 4))
    grid = window_grid(50, 70, 16, 24, 4)
    assert len(ds) == len(grid) == 4 * 4
    rebuilt = np.full((50, 70), -1)
    for k, (y, x) in enumerate(grid):
        image, mask = ds[k]
        assert image.shape == (3, 16, 24) and image.dtype == torch.float32 and mask.dtype == torch.int64
        rebuilt[y:y + 16, x:x + 24] = mask.numpy()
    assert np.array_equal(rebuilt, lab)


def test_small_tile_is_padded_with_ignore(tmp_path):
    split, _ = big_tile_set(tmp_path)
    ds = SegmentationPatches(split["root"], [["images/small.png", "masks/small.png"]], meta_of(split, (16, 16), 4))
    assert len(ds) == 1
    image, mask = ds[0]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16)
    assert (mask[11:, :] == 255).all() and (mask[:, 9:] == 255).all() and (mask[:11, :9] != 255).all()
    raw = np.asarray(Image.open(tmp_path / "images" / "small.png")).astype(np.float32) / 255
    mean, std = np.array(NORM["mean"]), np.array(NORM["std"])
    reflected = (raw[9, 0] - mean) / std  # row 11 mirrors row 9
    assert np.allclose(image[:, 11, 0].numpy(), reflected, atol=1e-5)


def test_augmentation_keeps_mask_values_and_changes_patches(tmp_path):
    split, _ = big_tile_set(tmp_path)
    items = [["images/big.png", "masks/big.png"], ["images/small.png", "masks/small.png"]]
    plain = SegmentationPatches(split["root"], items, meta_of(split, (32, 32), 0))
    aug = SegmentationPatches(split["root"], items, meta_of(split, (32, 32), 0), augment=True)
    torch.manual_seed(0)
    changed = 0
    for _ in range(6):
        for k in range(len(aug)):
            image, mask = aug[k]
            before = set(plain[k][1].unique().tolist())
            assert set(mask.unique().tolist()) <= before and image.shape == (3, 32, 32)
            changed += not torch.equal(mask, plain[k][1])
    assert changed > 0


def test_rot90_is_exact_and_joint():
    from torchvision import tv_tensors

    image = tv_tensors.Image(torch.arange(2 * 3 * 3).reshape(2, 3, 3))
    mask = tv_tensors.Mask(torch.arange(9).reshape(3, 3))
    rot = RandomRot90()
    for k in range(4):
        out_image, out_mask = rot.transform(image, {"k": k}), rot.transform(mask, {"k": k})
        assert torch.equal(out_image, torch.rot90(image, k, (-2, -1))) and isinstance(out_mask, tv_tensors.Mask)
        assert torch.equal(out_mask, torch.rot90(mask, k, (-2, -1)))


def test_non_square_windows_are_not_rotated():
    steps = [type(t).__name__ for t in joint_transform((16, 32), True, NORM["mean"], NORM["std"]).transforms]
    assert "RandomRot90" not in steps and "RandomResizedCrop" in steps
    steps = [type(t).__name__ for t in joint_transform((32, 32), True, NORM["mean"], NORM["std"]).transforms]
    assert "RandomRot90" in steps


def test_eval_dataset_gives_whole_images(tmp_path):
    split, lab = big_tile_set(tmp_path)
    ds = SegmentationImages(split["root"], split["train"], meta_of(split))
    index = [rel for rel, _ in ds.items].index("images/big.png")
    image, mask = ds[index]
    assert image.shape == (3, 50, 70) and mask.shape == (50, 70) and np.array_equal(mask.numpy(), lab)
    raw = np.asarray(Image.open(tmp_path / "images" / "big.png")).astype(np.float32) / 255
    expected = ((raw - np.array(NORM["mean"])) / np.array(NORM["std"])).transpose(2, 0, 1)
    assert np.allclose(image.numpy(), expected, atol=1e-5)
    images, masks = collate_tiles([ds[0], ds[1]])
    assert {tuple(m.shape) for m in masks} == {(50, 70), (11, 9)} and len(images) == 2


def test_file_unreadable_after_the_split(tmp_path):
    split, _ = big_tile_set(tmp_path)
    ds = SegmentationImages(split["root"], split["train"], meta_of(split))
    (tmp_path / "masks" / "small.png").write_bytes(b"garbage")
    bad = [rel for rel, _ in ds.items].index("images/small.png")
    with pytest.raises(UnreadableImage, match="small.png"):
        ds[bad]
    assert isinstance(SkipUnreadable(ds)[bad], Unreadable)


def test_patch_dataset_pickles_without_its_cache_and_decodes_a_tile_once(tmp_path, monkeypatch):
    split, _ = big_tile_set(tmp_path)
    ds = SegmentationPatches(split["root"], split["train"], meta_of(split, (16, 16), 0))
    decoded = []
    real = segdata.read_rgb
    monkeypatch.setattr(segdata, "read_rgb", lambda p: decoded.append(p) or real(p))
    for k in TileGroupedSampler(ds, group=1):
        ds[k]
    assert len(decoded) == 2 and len(ds._cache) == 2
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone._cache) == 0 and torch.equal(clone[3][1], ds[3][1])


def test_tile_grouped_sampler(tmp_path):
    split, _ = big_tile_set(tmp_path)
    ds = SegmentationPatches(split["root"], split["train"], meta_of(split, (16, 16), 0))
    sampler = TileGroupedSampler(ds, group=1, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(len(ds))) and len(sampler) == len(ds)
    tiles = [ds.tile_of(k) for k in first]
    assert tiles == sorted(tiles) or tiles == sorted(tiles, reverse=True)  # one tile after the other
    assert first != second or len(ds) < 3
    assert list(TileGroupedSampler(ds, group=1, seed=0)) == first


def test_count_ignored(tmp_path):
    split, _ = big_tile_set(tmp_path)
    rgb = np.asarray(Image.open(tmp_path / "masks" / "small.png")).copy()
    rgb[0, 0] = (0, 0, 0)
    rgb[0, 1] = (9, 9, 9)
    Image.fromarray(rgb).save(tmp_path / "masks" / "small.png")
    stats = count_ignored(split["root"], split["train"], meta_of(split))
    assert stats["total"] == 50 * 70 + 11 * 9 and stats["ignored"] == 2 and stats["unreadable"] == 0
    assert stats["unknown"] == 1 and stats["unknown_colors"] == [[9, 9, 9]]


DUBAI = Path(__file__).resolve().parents[2] / "shared" / "data" / "dubai_aerial"


@pytest.mark.slow
@pytest.mark.skipif(not DUBAI.is_dir(), reason="the Dubai aerial set is not in ../shared/data")
def test_dubai_aerial_set():
    """72 tiles in 8 groups; class_dict.csv has 6 rows: 5 classes and Unlabeled (ignore); the
    about 0.5 % pure-black pixels are a colour in no class, ignored and counted."""
    split = make_segmentation_split(DUBAI, progress=False)
    assert sum(split["counts"].values()) == 72 and split["skipped"] == []
    assert split["classes"] == ["Building", "Land (unpaved area)", "Road", "Vegetation", "Water"]
    assert split["layout"]["ignore_colors"] == [[155, 155, 155]] and split["layout"]["folders"] == 8
    px = split["pixels"]
    assert px["unknown_colors"] == [[0, 0, 0]] and 0.003 < px["unknown"] / px["total"] < 0.01
    assert px["ignored"] > px["unknown"]


def test_read_pair_and_the_colour_map_of_a_models_metadata(tmp_path):
    split, lab = big_tile_set(tmp_path)
    meta = {"classes": split["classes"], "colors": split["colors"], "ignore_index": 255,
            "data_layout": split["layout"], "layout": "NCHW", "input_size": [16, 16], "overlap": None}
    assert segdata.colormap_of(meta).ignore_colors == [(0, 0, 0)]
    assert segdata.colormap_of({**meta, "data_layout": None}).ignore_colors == []
    assert segdata.colormap_of({**meta, "colors": None}) is None
    image, mask = segdata.read_pair(tmp_path, "images/big.png", "masks/big.png", meta)
    assert image.shape == (50, 70, 3) and image.dtype == np.uint8
    assert mask.dtype == np.uint8 and np.array_equal(mask, lab)
    with pytest.raises(UnreadableImage, match="nothing.png"):
        segdata.read_pair(tmp_path, "images/big.png", "masks/nothing.png", meta)
    assert SegmentationPatches(tmp_path, split["train"], meta).overlap == 0
