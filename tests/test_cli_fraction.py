"""`--fraction F`: a seeded, stratified subset of the images each command reads, recorded; the split
file keeps the full split. And the per-epoch results.csv / results.png of the training stages."""
import csv
import json
from collections import Counter

import pytest

from rsedge.cli.main import main


def test_stratified_fraction_is_seeded_per_class_and_keeps_every_class():
    from rsedge.trainer.sampling import stratified_fraction

    items = [(f"c{c}/{i}.png", c) for c in range(3) for i in range((c + 1) * 10)] + [("c3/0.png", 3)]
    half = stratified_fraction(items, 0.5, seed=1)
    assert Counter(label for _, label in half) == {0: 5, 1: 10, 2: 15, 3: 1}
    assert set(half) == set(stratified_fraction(list(reversed(items)), 0.5, seed=1))
    assert half == stratified_fraction(items, 0.5, seed=1)
    assert set(half) != set(stratified_fraction(items, 0.5, seed=2))
    assert [it for it in items if it in set(half)] == half
    assert stratified_fraction(items, 1.0) == items
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="--fraction"):
            stratified_fraction(items, bad)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_on_a_fraction_writes_curves_and_keeps_the_full_split(tmp_path, synth_data, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(synth_data), "--model", "resnet18", "--img-size", "32", "--epochs", "2",
                 "--batch-size", "16", "--workers", "0", "--fraction", "0.25", "--optimizer", "adamw",
                 "--out", str(out), "--quiet"]) == 0
    rec = json.loads((out / "record.json").read_text())
    split = json.loads((out / "split.json").read_text())
    per_class_train = Counter(label for _, label in split["train"])
    assert len(split["train"]) == split["counts"]["train"] == rec["fraction"]["of"]
    assert rec["fraction"]["per_class"] == {split["classes"][c]: round(0.25 * n) for c, n in per_class_train.items()}
    assert rec["fraction"]["images"] == sum(rec["fraction"]["per_class"].values())
    assert rec["parameters"]["fraction"] == 0.25 and rec["parameters"]["lr"] == 1e-3
    rows = _rows(out / "results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_top1", "lr", "seconds"}
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([h["train_loss"] for h in rec["history"]],
                                                                    rel=1e-5)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rec["outputs"]["results"] == "results.csv" and rec["outputs"]["curves"] == "results.png"
    assert "--fraction 0.25" in capsys.readouterr().out


def test_finetune_with_adamw_and_no_lr_uses_1e3_and_writes_curves(tmp_path, synth_data, trained):
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(trained), "--data", str(synth_data), "--epochs", "1", "--workers", "0",
                 "--optimizer", "adamw", "--fraction", "0.5", "--out", str(out), "--quiet"]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["parameters"]["lr"] == 1e-3 and rec["fraction"]["fraction"] == 0.5
    assert len(_rows(out / "results.csv")) == 1 and (out / "results.png").is_file()
    split = json.loads((out / "split.json").read_text())
    assert split["train"] == json.loads((trained.parent / "split.json").read_text())["train"]


def test_eval_on_a_fraction(tmp_path, synth_data, trained):
    from rsedge.trainer.run import eval_run

    full = eval_run(trained, synth_data, progress=False, log=lambda m: None)
    part = eval_run(trained, synth_data, progress=False, log=lambda m: None, fraction=0.5, seed=3)
    assert part["samples"] == part["fraction"]["images"] < full["samples"] == part["fraction"]["of"]
    assert set(part["fraction"]["per_class"]) == set(full["per_class"])
    assert "fraction" not in full


def test_prune_reads_a_fraction_of_the_training_images(tmp_path, synth_data, trained):
    from rsedge.compress.prune import prune_run

    report = prune_run(trained, tmp_path, method="taylor", ratio=0.5, data=synth_data, taylor_batches=2,
                       batch_size=8, workers=0, fraction=0.2, progress=False, log=lambda m: None)
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["fraction"]["fraction"] == 0.2 and rec["fraction"]["images"] < rec["fraction"]["of"]
    assert rec["parameters"]["fraction"] == 0.2 and report["after"]["params"] < report["before"]["params"]


def test_data_check_on_a_fraction(tmp_path, synth_data, capsys):
    assert main(["data", "check", "--data", str(synth_data), "--fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "checked 90 of 180 images" in out
    assert main(["data", "check", "--data", str(synth_data), "--fraction", "0.5", "--out", str(tmp_path)]) == 2
    assert "cannot be written with --out" in capsys.readouterr().err
    assert not (tmp_path / "split.json").exists()


def test_export_calibrates_on_a_fraction(tmp_path, synth_data, trained, capsys):
    from rsedge.export.run import export_run

    rec = export_run(trained, tmp_path / "x", simplifier="none", int8=True, calib_data=synth_data, calib_size=16,
                     fraction=0.25, log=lambda m: None)
    pools = [v["calibration_pool"] for v in rec.values() if isinstance(v, dict) and "calibration_pool" in v]
    split = json.loads((trained.parent / "split.json").read_text())
    assert pools and all(p["images"] == 30 and p["of"] == len(split["train"]) for p in pools)
    assert rec["parameters"]["fraction"] == 0.25
    code = main(["export", "--model", str(trained), "--out", str(tmp_path / "y"), "--fraction", "0.5"])
    assert code == 2 and "needs --int8" in capsys.readouterr().err


def test_bundle_passes_its_fraction_to_the_calibration(monkeypatch, tmp_path):
    import rsedge.export.bundle as bundle_mod

    seen = {}

    def fake_export(model_file, out, options, log=print):
        seen["fraction"] = options.fraction
        raise ValueError("stop here: the options are what this test checks")

    monkeypatch.setattr(bundle_mod, "export_run", fake_export)
    monkeypatch.setattr(bundle_mod, "load_model", lambda path: (None, {}))
    rc = main(["bundle", "--model", "m.safetensors", "--out", str(tmp_path / "b"), "--fraction", "0.3"])
    assert rc == 2 and seen["fraction"] == 0.3
