"""Segmentation through the host stages: train on synthetic scenes, evaluate whole images by sliding
windows, export with the INT8 guard on mIoU, bundle, and the device's evaluation of the bundle,
which must give the host's numbers. A tiny registered model keeps it fast; DeepLabV3+ itself is
covered by test_seg_models / test_seg_prune and the slow end-to-end test below."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from rsedge.trainer.models import ModelSpec, register_model, unregister_model

QUIET = {"progress": False, "log": lambda m: None}


class TinySeg(nn.Module):
    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def tiny_spec():
    register_model(ModelSpec("tiny_seg", "segmentation", TinySeg, head=("head",)), replace=True)
    yield "tiny_seg"
    unregister_model("tiny_seg")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from rsedge.trainer.synth_seg import write_synthetic_segmentation

    root = tmp_path_factory.mktemp("scenes")
    write_synthetic_segmentation(root, n_images=14, size=80, seed=1, progress=False)
    return root


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, tiny_spec, scenes):
    from rsedge.trainer.run import train_run
    from rsedge.trainer.train import TrainConfig

    out = tmp_path_factory.mktemp("segrun")
    cfg = TrainConfig(epochs=3, batch_size=8, optimizer="adamw", lr=1e-2, workers=0, seed=0)
    record = train_run(scenes, tiny_spec, out, img_size=32, overlap=8, cfg=cfg, **QUIET)
    return out, record


def test_training_records_whole_image_metrics_and_the_data_it_read(seg_run, scenes):
    from rsedge.trainer.modelfile import read_metadata

    out, record = seg_run
    test = record["test"]
    assert set(test) >= {"miou", "global_accuracy", "mean_accuracy", "fwiou", "mean_bf", "per_class", "samples"}
    assert 0.3 < test["miou"] <= 1.0 and test["samples"] == record["split"]["counts"]["test"]
    meta = read_metadata(out / "model.safetensors")
    assert meta["task"] == "segmentation" and meta["overlap"] == 8 and meta["ignore_index"] == 255
    assert meta["classes"] == ["background", "field", "road", "building", "water"]
    assert len(meta["colors"]) == 5 and meta["data_layout"]["mask_kind"] == "color"
    split = json.loads((out / "split.json").read_text())
    assert split["task"] == "segmentation" and all(m.startswith("masks/") for _, m in split["train"])
    for name in ("overlays.png", "confusion.png", "metrics.json", "results.png"):
        assert (out / name).stat().st_size > 0
    assert "examples" not in json.loads((out / "metrics.json").read_text())


def test_eval_of_the_model_folder_repeats_the_test_numbers(seg_run, scenes, tmp_path):
    from rsedge.trainer.run import eval_run

    out, record = seg_run
    result = eval_run(out / "model.safetensors", scenes, tmp_path / "eval", **QUIET)
    assert result["split"] == "test" and result["miou"] == pytest.approx(record["test"]["miou"], abs=1e-9)
    assert (tmp_path / "eval" / "overlays.png").is_file()


def test_sliding_predictor_gives_one_full_size_map_per_image(seg_run):
    from rsedge.trainer.modelfile import load_model
    from rsedge.trainer.tasks import task_for

    out, _ = seg_run
    model, meta = load_model(out / "model.safetensors")
    predict = task_for(meta).predictor(meta)
    images = [torch.randn(3, 45, 70), torch.randn(3, 20, 33)]
    with torch.no_grad():
        maps = predict(model.eval(), images)
        direct = model(images[0][None]).numpy()[0]
    assert [m.shape for m in maps] == [(5, 45, 70), (5, 20, 33)]
    # windows see less context than the whole image: same sign of evidence almost everywhere
    assert np.mean(maps[0].argmax(0) == direct.argmax(0)) > 0.8
    batch = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(predict(model, batch), model(batch))


def test_dice_term_is_zero_for_a_perfect_prediction_and_ignores_unlabelled_pixels():
    from rsedge.trainer.tasks.segmentation import IGNORE_INDEX, dice_loss

    targets = torch.tensor([[[0, 1], [2, IGNORE_INDEX]]])
    perfect = torch.nn.functional.one_hot(targets.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, targets).item() == pytest.approx(0.0, abs=1e-6)
    wrong = perfect.roll(1, dims=1)
    assert dice_loss(wrong, targets).item() > 0.5
    perfect[0, :, 1, 1] = torch.tensor([0.0, 0.0, 99.0])  # the unlabelled pixel says anything: no change
    assert dice_loss(perfect, targets).item() == pytest.approx(0.0, abs=1e-6)


def test_export_guard_on_miou_and_the_device_scores_the_bundle_as_the_host(seg_run, scenes, tmp_path, capsys,
                                                                           no_tensorrt):
    from rsedge.export.bundle import bundle_run
    from rsedge.runtime import cli as bench_cli
    from rsedge.trainer.run import eval_run

    out, record = seg_run
    bundle = tmp_path / "bundle"
    bundle_run(out / "model.safetensors", bundle, calib_size=8, max_drop=5.0, log=lambda m: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["eval"]["count"] == record["split"]["counts"]["test"]
    guard = manifest["export"]["int8_guard"]["int8-cpu"]
    assert guard["metric"] == "miou" and guard["status"] == "written" and guard["fp32_miou"] > 0.3
    assert bench_cli.main([str(bundle), "--json", str(tmp_path / "r.json"), "--warmup", "0", "--iterations", "2",
                           "--duration", "0", "--no-power", "--save-predictions", str(tmp_path / "pred")]) == 0
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    fp32 = next(r for r in runs if r["label"].endswith("fp32 (onnx)"))
    host = eval_run(out / "model.safetensors", scenes, None, **QUIET)
    assert fp32["accuracy"]["miou"] == pytest.approx(host["miou"], abs=1e-4)
    assert fp32["accuracy"]["n"] == host["samples"]
    saved = sorted((tmp_path / "pred").glob("*/0000.*"))
    assert saved, "predicted masks are written per variant"


def test_cli_writes_scenes_and_checks_a_segmentation_folder(tmp_path, capsys):
    from rsedge.cli.main import main

    data = tmp_path / "scenes"
    assert main(["data", "synth", "--task", "segment", "--out", str(data), "--images", "6", "--size", "64"]) == 0
    assert len(list((data / "images").iterdir())) == len(list((data / "masks").iterdir())) == 6
    assert main(["data", "check", "--data", str(data), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "segmentation, 5 classes (color masks" in out and "ignored (unlabelled or a colour in no class)" in out
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["task"] == "segmentation" and sum(split["counts"].values()) == 6


def test_a_segmentation_model_refuses_a_window_that_is_no_multiple_of_32(tmp_path, scenes, capsys):
    from rsedge.cli.main import main

    assert main(["train", "--data", str(scenes), "--model", "deeplabv3plus_resnet18", "--img-size", "50",
                 "--out", str(tmp_path / "r"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "multiples of 32" in err and len(err.strip().splitlines()) == 1


def test_target_regions_mark_the_objects_against_the_dominant_class_at_the_feature_size():
    from rsedge.trainer.tasks import get_task

    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, :2, :2] = 3  # an object
    mask[0, 6:, 6:] = 255  # unlabelled
    one_class = torch.ones(1, 8, 8, dtype=torch.long)

    def fm(images):
        return images, torch.zeros(len(images), 4, 4, 4)

    regions = get_task("segmentation").target_regions(fm, torch.zeros(2, 3, 8, 8), torch.cat([mask, one_class]))
    assert regions.shape == (2, 4, 4)
    assert regions[0].tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert regions[1].sum() == 16  # one class only: all of its labelled pixels


def test_samples_and_fractions_of_image_mask_pairs_are_seeded_subsets():
    from rsedge.export.run import stratified_sample
    from rsedge.trainer.sampling import fraction_info, stratified_fraction

    pairs = [[f"images/{i:03d}.png", f"masks/{i:03d}.png"] for i in range(20)]
    picked = stratified_sample(pairs, 5, seed=3)
    assert len(picked) == 5 and len(set(picked)) == 5 and all(list(p) in pairs for p in picked)
    assert picked == stratified_sample(pairs, 5, seed=3)
    part = stratified_fraction(pairs, 0.25, seed=1)
    assert len(part) == 5 and part == stratified_fraction(pairs, 0.25, seed=1)
    assert [p for p in map(tuple, pairs) if p in part] == part  # the order of the split is kept
    info = fraction_info(0.25, 1, part, pairs)
    assert info["images"] == 5 and info["of"] == 20 and "per_class" not in info


def test_train_fraction_thins_the_tiles_before_they_are_cut(tmp_path, tiny_spec, scenes):
    from rsedge.trainer.run import train_run
    from rsedge.trainer.train import TrainConfig

    cfg = TrainConfig(epochs=1, batch_size=8, optimizer="adamw", workers=0, fraction=0.5)
    record = train_run(scenes, tiny_spec, tmp_path / "r", img_size=32, cfg=cfg, **QUIET)
    assert record["fraction"]["images"] == round(0.5 * record["split"]["counts"]["train"])
    assert record["test"]["samples"] == record["split"]["counts"]["test"]  # test stays whole


def test_deeplab_through_every_stage_from_the_cli(tmp_path, capsys):
    """The README's segmentation walk-through, shortened (about 15 s, so CI runs it as the
    segmentation smoke): DeepLabV3+ from `data synth` to `rsedge-bench` on its bundle."""
    from rsedge.cli.main import main
    from rsedge.runtime import cli as bench_cli

    d, r = str(tmp_path / "scenes"), tmp_path / "runs"
    quick = ["--batch-size", "8", "--optimizer", "adamw", "--workers", "0", "--quiet"]
    assert main(["data", "synth", "--task", "segment", "--out", d, "--images", "16", "--size", "64"]) == 0
    assert main(["train", "--data", d, "--model", "deeplabv3plus_resnet18", "--img-size", "64", "--epochs", "1",
                 "--out", str(r / "seg"), *quick]) == 0
    assert main(["prune", "--model", str(r / "seg/model.safetensors"), "--method", "taylor", "--ratio", "0.35",
                 "--steps", "3", "--step-epochs", "0", "--taylor-batches", "1", "--batch-size", "8", "--data", d,
                 "--workers", "0", "--out", str(r / "pruned"), "--quiet"]) == 0
    assert main(["finetune", "--model", str(r / "pruned/model.safetensors"), "--data", d, "--epochs", "1",
                 "--out", str(r / "ft"), *quick]) == 0
    assert main(["quantize", str(r / "ft/model.safetensors"), "--out", str(r / "q8"), "--quiet"]) == 0
    assert main(["export", "--model", str(r / "q8/model.safetensors"), "--out", str(r / "q8-onnx")]) == 0
    assert main(["export", "--model", str(r / "ft/model.safetensors"), "--out", str(r / "onnx"), "--int8",
                 "--max-drop", "5", "--calib-size", "8"]) == 0
    assert main(["bundle", "--model", str(r / "ft/model.safetensors"), "--out", str(r / "bundle"),
                 "--calib-size", "8", "--max-drop", "5"]) == 0
    assert bench_cli.main([str(r / "bundle"), "--warmup", "0", "--iterations", "2", "--duration", "0",
                           "--no-power", "--json", str(r / "bench.json")]) == 0
    runs = json.loads((r / "bench.json").read_text())["runs"]
    assert all(run["accuracy"]["miou"] is not None for run in runs)
    q8 = (r / "q8-onnx" / "model.onnx").stat().st_size / (r / "onnx" / "model.onnx").stat().st_size
    assert q8 < 0.35  # int8 weights behind DequantizeLinear


def test_prune_fraction_thins_the_tiles_before_they_are_cut(tmp_path, seg_run, scenes):
    """--fraction on a segmentation model's Taylor scoring: the split's training images are thinned
    before the windows are cut (thinning a window dataset's items afterwards left stale windows)."""
    from rsedge.compress.prune import prune_run

    out, record = seg_run
    prune_run(out / "model.safetensors", tmp_path / "p", method="taylor", ratio=0.25, data=scenes, fraction=0.5,
              taylor_batches=2, batch_size=4, workers=0, **QUIET)
    pruned = json.loads((tmp_path / "p" / "record.json").read_text())
    assert pruned["fraction"]["images"] == round(0.5 * record["split"]["counts"]["train"])
