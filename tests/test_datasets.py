from pathlib import Path

import pytest

from rsedge.trainer.datasets import (
    DatasetError,
    check_classes,
    make_split,
    resolve_split,
    scan_image_folder,
    stratified_split,
)

EUROSAT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eurosat_rgb"


def _folder(tmp_path, counts, ext="png"):
    from PIL import Image

    for cls, n in counts.items():
        (tmp_path / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 10 % 255, 0, 0)).save(tmp_path / cls / f"{i}.{ext}")
    return tmp_path


def test_split_is_deterministic_stratified_and_disjoint(tmp_path):
    root = _folder(tmp_path, {"a": 20, "b": 10, "c": 30})
    s1 = make_split(root, val=0.1, test=0.2, seed=3, progress=False)
    s2 = make_split(root, val=0.1, test=0.2, seed=3, progress=False)
    s3 = make_split(root, val=0.1, test=0.2, seed=4, progress=False)
    assert s1["train"] == s2["train"] and s1["test"] == s2["test"]
    assert s1["test"] != s3["test"]
    parts = [{tuple(x) for x in s1[p]} for p in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(len(p) for p in parts) == 60
    test_per_class = {c: sum(1 for _, lab in s1["test"] if lab == i) for i, c in enumerate(s1["classes"])}
    assert test_per_class == {"a": 4, "b": 2, "c": 6}


def test_small_classes_still_reach_val_and_test():
    parts = stratified_split([(f"x{i}", 0) for i in range(3)], val=0.1, test=0.1, seed=0)
    assert (len(parts["train"]), len(parts["val"]), len(parts["test"])) == (1, 1, 1)


def test_corrupt_images_are_skipped_and_listed(tmp_path):
    root = _folder(tmp_path, {"a": 5, "b": 5}, ext="jpg")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = (root / "b" / "0.jpg").read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    split = make_split(root, progress=False)
    skipped = {s["path"] for s in split["skipped"]}
    assert skipped == {"a/broken.jpg", "b/truncated.jpg"}
    listed = {rel for p in ("train", "val", "test") for rel, _ in split[p]}
    assert len(listed) == 10 and not (listed & skipped)


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = _folder(tmp_path, {"forest": 3})
    (root / "water").mkdir()
    with pytest.raises(DatasetError, match="water"):
        scan_image_folder(root)


def test_class_folder_with_only_unreadable_images_is_an_error(tmp_path):
    root = _folder(tmp_path, {"forest": 3})
    (root / "water").mkdir()
    (root / "water" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="water"):
        make_split(root, progress=False)


def test_class_mismatch_names_the_classes():
    with pytest.raises(DatasetError, match="missing from the dataset: river.*not known to the model: lake"):
        check_classes(["forest", "river"], ["forest", "lake"])
    with pytest.raises(DatasetError, match="another order"):
        check_classes(["a", "b"], ["b", "a"])
    check_classes(["a", "b"], ["a", "b"])


def test_resolve_split_reuses_the_written_split(tmp_path):
    root = _folder(tmp_path / "data", {"a": 10, "b": 10})
    run = tmp_path / "run"
    first = resolve_split(root, run, seed=1, progress=False)
    assert (run / "split.json").is_file()
    again = resolve_split(root, run, seed=99, progress=False)  # another seed: the written split wins
    assert again["test"] == first["test"]
    (root / "c").mkdir()
    (root / "c" / "new.png").write_bytes((root / "a" / "0.png").read_bytes())
    with pytest.raises(DatasetError, match="not known to the model: c"):
        resolve_split(root, run, progress=False)


@pytest.mark.skipif(not EUROSAT.is_dir(), reason="real EuroSAT not present at ../shared/data/eurosat_rgb")
def test_reads_real_eurosat_layout_unchanged():
    classes, samples = scan_image_folder(EUROSAT)
    assert classes == sorted(
        ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
         "Residential", "River", "SeaLake"]
    )
    assert len(samples) == 27000
    parts = stratified_split(samples, 0.0, 0.2, seed=0)
    assert len(parts["test"]) == 5400 and len(parts["train"]) == 21600
