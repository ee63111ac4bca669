"""Bad input ends in one line and exit code 2, and nothing the user already has is lost (issue 10):
files that are not models, images that became unreadable after the split, run directories that
already hold a run, synthetic data written over old data, weights of another architecture,
detection and segmentation datasets given to the classification commands."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from rsedge.cli.main import main
from rsedge.trainer.datasets import DatasetError, scan_image_folder
from rsedge.trainer.modelfile import ModelFileError, load_model, read_metadata
from rsedge.trainer.models import create_model, load_initial_weights
from rsedge.trainer.synth import make_synthetic_dataset

QUIET = {"progress": False, "log": lambda m: None}


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _onnx_file(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.fixture(scope="module")
def not_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("not_models")
    rng = torch.Generator().manual_seed(0)
    noise = bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).tolist())
    (d / "random.safetensors").write_bytes(noise)
    (d / "garbage.pth").write_bytes(noise[:1000])
    return {"random.safetensors": d / "random.safetensors", "model.onnx": _onnx_file(d / "model.onnx"),
            "garbage.pth": d / "garbage.pth"}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    make_synthetic_dataset(root, per_class=6, size=16, seed=0)
    return root


def _model_commands(model: str, data: str, out: str) -> dict[str, list[str]]:
    return {
        "info": ["info", model],
        "eval": ["eval", "--model", model, "--data", data, "--out", out],
        "prune": ["prune", "--model", model, "--out", out],
        "finetune": ["finetune", "--model", model, "--data", data, "--out", out],
        "sparse-train": ["sparse-train", "--model", model, "--data", data, "--out", out],
        "export": ["export", "--model", model, "--out", out],
        "bundle": ["bundle", "--model", model, "--out", out],
        "train": ["train", "--data", data, "--model", "resnet18", "--weights", model, "--out", out],
    }


@pytest.mark.parametrize("kind", ["random.safetensors", "model.onnx", "garbage.pth"])
@pytest.mark.parametrize("command", ["info", "eval", "prune", "finetune", "sparse-train", "export", "bundle", "train"])
def test_a_file_that_is_no_model_is_one_line_for_every_command(tmp_path, capsys, not_models, small_data, kind,
                                                               command):
    out = tmp_path / "runs" / "out"
    argv = _model_commands(str(not_models[kind]), str(small_data), str(out))[command]
    err = _one_line_error(capsys, main(argv))
    assert kind in err and f"rsedge {command}: error:" in err
    if kind == "model.onnx":
        assert "is an ONNX file" in err
    assert not (tmp_path / "runs").exists(), "a failed command left its (empty) run directory behind"


def test_model_file_errors_say_what_the_file_is(tmp_path, not_models, trained):
    with pytest.raises(ModelFileError, match="model.onnx is an ONNX file, not an rsedge model file"):
        read_metadata(not_models["model.onnx"])
    data = trained.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="cut.safetensors is a damaged or truncated safetensors file"):
        load_model(tmp_path / "cut.safetensors")
    with pytest.raises(ModelFileError, match="did you mean .*model.safetensors"):
        load_model(trained.parent)
    torch.save(create_model("resnet18", 3), tmp_path / "whole.pth")
    with pytest.raises(ModelFileError, match="whole model object"):
        load_initial_weights(create_model("resnet18", 3), tmp_path / "whole.pth")


def test_a_failed_command_removes_only_the_empty_folders_it_created(tmp_path, capsys, not_models):
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["prune", "--model", str(not_models["model.onnx"]), "--out", str(kept)]) == 2
    assert kept.is_dir(), "a folder that existed before the command must stay"
    assert main(["prune", "--model", str(not_models["model.onnx"]), "--out", str(tmp_path / "a" / "b" / "c")]) == 2
    assert not (tmp_path / "a").exists()
    capsys.readouterr()


# -- images that became unreadable after the split ------------------------------------------------


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory):
    """A model trained on clean data, then one image of each part of its split damaged."""
    from rsedge.trainer.datasets import load_split
    from rsedge.trainer.run import train_run
    from rsedge.trainer.train import TrainConfig

    root = tmp_path_factory.mktemp("damaged")
    data = root / "data"
    make_synthetic_dataset(data, per_class=8, size=24, seed=1)
    cfg = TrainConfig(epochs=1, batch_size=16, optimizer="adamw", lr=1e-3, workers=0, seed=0, device="cpu")
    train_run(data, "resnet18", root / "base", img_size=24, cfg=cfg, **QUIET)
    split = load_split(root / "base" / "split.json")
    damaged = {part: split[part][0][0] for part in ("train", "val", "test")}
    for rel in damaged.values():
        (data / rel).write_bytes(b"\x89PNG\r\n\x1a\n truncated after the split")
    return {"data": data, "model": root / "base" / "model.safetensors", "damaged": damaged}


def test_finetune_skips_and_counts_images_unreadable_since_the_split(tmp_path, damaged_run):
    from rsedge.compress.finetune import finetune_run
    from rsedge.trainer.train import TrainConfig

    logs: list[str] = []
    cfg = TrainConfig(epochs=1, batch_size=16, optimizer="adamw", lr=1e-3, workers=1, seed=0, device="cpu")
    rec = finetune_run(damaged_run["model"], damaged_run["data"], tmp_path / "ft", cfg=cfg, progress=False,
                       log=logs.append)
    assert rec["history"][0]["skipped_images"] == 2  # one train image, one validation image
    assert rec["history"][0]["val_top1"] is not None
    assert rec["test"]["skipped_images"] == 1
    warnings = [m for m in logs if "unreadable since the split" in m]
    assert len(warnings) == 2, logs  # once for epoch 1 (train + val), once for the test evaluation
    assert "epoch 1: 2 image(s)" in warnings[0]
    assert (tmp_path / "ft" / "model.safetensors").is_file()


def test_eval_skips_and_counts_them_too(tmp_path, damaged_run):
    from rsedge.trainer.run import eval_run

    result = eval_run(damaged_run["model"], damaged_run["data"], tmp_path / "ev", part="val", workers=0, **QUIET)
    assert result["skipped_images"] == 1 and damaged_run["damaged"]["val"] in result["skipped"][0]
    assert result["samples"] == len(json.loads((damaged_run["model"].parent / "split.json").read_text())["val"]) - 1


def test_a_failure_after_an_epoch_leaves_that_epoch_resumable(tmp_path, damaged_run, monkeypatch):
    """The checkpoint of a finished epoch is written before its validation: a validation that
    fails loses nothing, and the resumed run validates that epoch first."""
    from rsedge.compress.finetune import finetune_run
    from rsedge.trainer import train as train_mod
    from rsedge.trainer.train import TrainConfig

    real = train_mod.evaluate

    def failing_validation(*a, **k):
        raise RuntimeError("validation died (disk, driver, out of memory...)")

    cfg = TrainConfig(epochs=2, batch_size=16, optimizer="adamw", lr=1e-3, workers=0, seed=0, device="cpu")
    out = tmp_path / "ft"
    monkeypatch.setattr(train_mod, "evaluate", failing_validation)
    with pytest.raises(RuntimeError, match="validation died"):
        finetune_run(damaged_run["model"], damaged_run["data"], out, cfg=cfg, **QUIET)
    monkeypatch.setattr(train_mod, "evaluate", real)
    ckpt = out / "checkpoint.safetensors"
    assert ckpt.is_file(), "the finished epoch was lost"
    assert read_metadata(ckpt)["checkpoint"]["epoch"] == 0
    logs: list[str] = []
    rec = finetune_run(damaged_run["model"], damaged_run["data"], out, cfg=cfg, resume=True, progress=False,
                       log=logs.append)
    assert [h["epoch"] for h in rec["history"]] == [1, 2]
    assert all(h["val_top1"] is not None for h in rec["history"])
    assert any("validating epoch 1" in m for m in logs) and any("resuming" in m for m in logs)


# -- run directories -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "finetune", "sparse-train", "prune"])
def test_a_run_directory_that_holds_a_run_is_refused(tmp_path, capsys, trained, small_data, command):
    out = tmp_path / "run"
    out.mkdir()
    (out / "record.json").write_text('{"stage": "an earlier run"}')
    argv = {
        "train": ["train", "--data", str(small_data), "--model", "resnet18", "--out", str(out)],
        "finetune": ["finetune", "--model", str(trained), "--data", str(small_data), "--out", str(out)],
        "sparse-train": ["sparse-train", "--model", str(trained), "--data", str(small_data), "--out", str(out)],
        "prune": ["prune", "--model", str(trained), "--out", str(out)],
    }[command]
    err = _one_line_error(capsys, main(argv))
    assert "already holds a run (record.json)" in err and "--exist-ok" in err and "--resume" in err
    assert (out / "record.json").read_text() == '{"stage": "an earlier run"}'


@pytest.mark.parametrize("command,target", [("train", "rsedge.trainer.run.train_run"),
                                            ("finetune", "rsedge.compress.finetune.finetune_run"),
                                            ("sparse-train", "rsedge.compress.sparse.sparse_train_run"),
                                            ("prune", "rsedge.compress.prune.prune_run")])
def test_exist_ok_reaches_the_run_function(monkeypatch, command, target):
    seen = {}
    module, name = target.rsplit(".", 1)

    def run(*a, **k):  # the CLI builds the stage's options object: what it says is what reached the stage
        seen.update(k)
        seen.update(next((vars(x) for x in (*a, *k.values()) if dataclasses.is_dataclass(x)), {}))

    monkeypatch.setattr(module + "." + name, run)
    base = {"train": ["train", "--data", "d", "--model", "resnet18"]}.get(command, [command, "--model", "m"])
    if command in ("finetune", "sparse-train"):
        base += ["--data", "d"]
    assert main(base + ["--out", "o", "--exist-ok"]) == 0
    assert seen["exist_ok"] is True


def test_exist_ok_removes_the_previous_run_first(tmp_path):
    from rsedge.trainer.run import open_run_dir

    out = tmp_path / "run"
    out.mkdir()
    for name in ("record.json", "model.safetensors", "checkpoint.safetensors", "split.json", "notes.txt"):
        (out / name).write_text("old")
    with pytest.raises(FileExistsError, match="already holds a run"):
        open_run_dir(out)
    assert open_run_dir(out, resume=True) == out and (out / "checkpoint.safetensors").is_file()
    logs: list[str] = []
    open_run_dir(out, exist_ok=True, log=logs.append)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert "removed the previous run's" in logs[0]


# -- data synth ----------------------------------------------------------------------------------


def test_data_synth_never_mixes_old_and_new_images(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--per-class", "3", "--size", "8"]) == 0
    err = _one_line_error(capsys, main(["data", "synth", "--out", str(out), "--per-class", "2", "--size", "8"]))
    assert "already holds a synthetic dataset" in err and "--exist-ok" in err
    assert len(list(out.rglob("*.png"))) == 18
    assert main(["data", "synth", "--out", str(out), "--per-class", "2", "--size", "8", "--exist-ok"]) == 0
    assert len(list(out.rglob("*.png"))) == 12, "images of the earlier run were left among the new ones"
    (out / "forest" / "my_photo.jpg").write_bytes(b"not written by synth")
    err = _one_line_error(capsys, main(["data", "synth", "--out", str(out), "--size", "8", "--exist-ok"]))
    assert "did not write" in err and "my_photo.jpg" in err
    assert (out / "forest" / "my_photo.jpg").is_file(), "--exist-ok must never delete the user's files"


# -- initial weights -----------------------------------------------------------------------------


def test_weights_of_another_architecture_are_refused_unless_partial(tmp_path, capsys, small_data):
    from safetensors.torch import save_file

    save_file(create_model("resnet34", 10).state_dict(), str(tmp_path / "r34.safetensors"))
    save_file(create_model("resnet18", 10).state_dict(), str(tmp_path / "r18.safetensors"))
    rep = load_initial_weights(create_model("resnet18", 4), tmp_path / "r18.safetensors", arch="resnet18")
    assert (rep["loaded"], rep["of"]) == (100, 100)
    assert "loaded 100/100 tensors of resnet18" in rep["message"] and "head `fc` starts fresh" in rep["message"]
    with pytest.raises(ModelFileError, match="80 of its 180 fit no layer.*--partial-weights"):
        load_initial_weights(create_model("resnet18", 4), tmp_path / "r34.safetensors")
    save_file(create_model("resnet50", 10).state_dict(), str(tmp_path / "r50.safetensors"))
    with pytest.raises(ModelFileError, match="77/100 tensors of resnet18"):
        load_initial_weights(create_model("resnet18", 4), tmp_path / "r50.safetensors", arch="resnet18")
    model = create_model("resnet18", 4)
    rep = load_initial_weights(model, tmp_path / "r50.safetensors", partial=True)
    assert rep["loaded"] == 77 and rep["partial"]
    out = tmp_path / "run"
    err = _one_line_error(capsys, main(["train", "--data", str(small_data), "--model", "resnet18", "--weights",
                                        str(tmp_path / "r50.safetensors"), "--out", str(out)]))
    assert "--partial-weights" in err and not out.exists()


# -- detection and segmentation layouts ----------------------------------------------------------


def _img(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def _layouts(root: Path) -> dict[str, tuple[Path, str]]:
    nwpu = root / "nwpu"
    _img(nwpu / "positive image set" / "001.jpg")
    (nwpu / "ground truth").mkdir(parents=True)
    (nwpu / "ground truth" / "001.txt").write_text("(1,2),(5,6),1\n")
    yolo = root / "yolo"
    _img(yolo / "images" / "train" / "a.jpg")
    (yolo / "labels" / "train").mkdir(parents=True)
    (yolo / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    coco = root / "coco"
    _img(coco / "train2017" / "a.jpg")
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": []}))
    seg = root / "seg"
    _img(seg / "images" / "a.jpg")
    _img(seg / "masks" / "a.png")
    tiles = root / "tiles"
    for t in ("Tile 1", "Tile 2"):
        _img(tiles / t / "images" / "image_part_001.jpg")
        _img(tiles / t / "masks" / "image_part_001.png")
    dict_csv = root / "camvid"
    _img(dict_csv / "scenes" / "a.jpg")
    _img(dict_csv / "labels_rgb" / "a.png")
    (dict_csv / "class_dict.csv").write_text("name,r,g,b\nBuilding,60,16,152\n")
    return {"nwpu": (nwpu, "detection dataset (NWPU VHR-10 layout"),
            "nwpu-images": (nwpu / "positive image set", "detection dataset (NWPU VHR-10 layout"),
            "yolo": (yolo, "detection dataset (YOLO layout"),
            "coco": (coco, "COCO layout: annotations/instances_train2017.json"),
            "seg": (seg, "segmentation dataset (images/ and masks/"),
            "tiles": (tiles, "segmentation dataset (tiles of images/ and masks/: Tile 1, Tile 2"),
            "tile": (tiles / "Tile 1", "segmentation dataset (images/ and masks/"),
            "class_dict": (dict_csv, "segmentation dataset (class_dict.csv")}


def test_detection_and_segmentation_layouts_are_named(tmp_path, capsys):
    for name, (root, says) in _layouts(tmp_path).items():
        with pytest.raises(DatasetError) as e:
            scan_image_folder(root)
        msg = str(e.value)
        assert "classification commands read ROOT/<class>/<image>" in msg and says in msg, (name, msg)
    capsys.readouterr()
    assert main(["data", "check", "--data", str(tmp_path / "nwpu")]) == 0  # a detection dataset, checked as one
    assert "detection (nwpu layout), 10 classes, 1 images, 1 boxes" in capsys.readouterr().out


def test_a_classification_folder_is_still_read(small_data, tmp_path):
    classes, samples = scan_image_folder(small_data)
    assert len(classes) == 6 and len(samples) == 36
    nested = tmp_path / "ucm"
    for c in ("a", "b"):
        _img(nested / "Images" / c / "1.jpg")
    with pytest.raises(DatasetError, match=r"single class folder, Images.*is .*Images the dataset root"):
        scan_image_folder(nested)
    assert len(scan_image_folder(nested / "Images")[0]) == 2

