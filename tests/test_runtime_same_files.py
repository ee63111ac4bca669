"""`rsedge eval --split all` and `rsedge-bench --eval DIR` read an image folder the same way."""

import json
import os
import shutil
from collections import Counter

import numpy as np

from rsedge.runtime.imagefolder import IMAGE_EXTENSIONS, list_labeled_folder, scan_class_folders

FAST = ["--warmup", "0", "--iterations", "2", "--duration", "0", "--no-power"]


def make_messy_folder(root, sources):
    """class_i/ gets i+2 images: at the top, nested two levels deep, with upper- and mixed-case extensions,
    plus a .npy picture; and files neither side may read: hidden files, a hidden folder, a text file."""
    for i, (name, pictures) in enumerate(sorted(sources.items())):
        cls = root / name
        places = [cls / "A.PNG", cls / "sub" / "deeper" / "b.Png", cls / "sub" / "c.png"] + [
            cls / "more" / f"x{k}.pNg" for k in range(i)]
        for k, dest in enumerate(places[:i + 2]):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(str(pictures[k % len(pictures)]), str(dest))
        if i == 0:
            with open(str(cls / "sub" / "array.NPY"), "wb") as f:  # np.save(path) would add ".npy"
                np.save(f, np.full((32, 32, 3), 128, np.uint8))
        (cls / "sub" / ".hidden.png").write_bytes(pictures[0].read_bytes())
        (cls / ".cache").mkdir()
        (cls / ".cache" / "thumb.png").write_bytes(pictures[0].read_bytes())
        (cls / "notes.txt").write_text("not an image")
    (root / ".trash").mkdir()
    return root


def expected_counts(sources):
    return {name: i + 2 + (1 if i == 0 else 0) for i, name in enumerate(sorted(sources))}


def _sources(synth_data):
    return {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() == ".png")[:3]
            for d in sorted(synth_data.iterdir()) if d.is_dir()}


def test_host_and_device_scans_list_the_same_files(tmp_path, synth_data):
    from rsedge.trainer.datasets import scan_image_folder

    sources = _sources(synth_data)
    root = make_messy_folder(tmp_path / "messy", sources)
    classes, samples = scan_image_folder(root)
    items, device_classes = list_labeled_folder(str(root))
    assert classes == device_classes == sorted(sources)
    assert [(os.path.relpath(p, str(root)).replace(os.sep, "/"), y) for p, y in items] == samples
    assert dict(Counter(classes[y] for _, y in samples)) == expected_counts(sources)
    assert not any("/." in "/" + rel or rel.endswith(".txt") for rel, _ in samples)
    assert [name for name, _ in scan_class_folders(str(root))] == classes
    assert ".npy" in IMAGE_EXTENSIONS and any(rel.endswith(".NPY") for rel, _ in samples)


def test_rsedge_eval_and_rsedge_bench_eval_see_the_same_images(tmp_path, synth_data, trained, capsys):
    from rsedge.cli.main import main

    sources = _sources(synth_data)
    root = make_messy_folder(tmp_path / "messy", sources)
    assert main(["eval", "--model", str(trained), "--data", str(root), "--split", "all", "--out",
                 str(tmp_path / "ev"), "--quiet"]) == 0
    host = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert main(["bench", str(trained), "--eval", str(root), "--json", str(tmp_path / "b.json")] + FAST) == 0
    device = json.loads((tmp_path / "b.json").read_text())["runs"][0]["accuracy"]
    counts = expected_counts(sources)
    classes = sorted(sources)
    assert host["samples"] == device["n"] == sum(counts.values())
    assert {c: sum(row) for c, row in zip(classes, host["confusion"])} == counts
    assert {c: v["n"] for c, v in device["per_class"].items()} == counts
    assert device["skipped"] == 0
    capsys.readouterr()
