"""Segmentation on the device: the eval-set packing, metadata keys, the task, sliding-window evaluation
of a tiny ONNX model whose argmax is the dominant colour channel, and rsedge-bench on a bundle."""

import json
import os

import numpy as np
import pytest
from runtime_fakes import FAST

from rsedge.runtime import cli, evaluate, preprocess, tasks
from rsedge.runtime.errors import RuntimeToolError
from rsedge.runtime.tasks import segmentation as seg
from rsedge.runtime.tasks.base import EvalOptions

CLASSES = ["field", "road", "water"]
COLORS = [[40, 160, 40], [128, 128, 128], [30, 60, 200]]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def seg_props(overlap=8, colors=COLORS):
    return {"rsedge.task": "segmentation", "rsedge.classes": json.dumps(CLASSES), "rsedge.colors": json.dumps(colors),
            "rsedge.ignore_index": "255", "rsedge.overlap": str(overlap), "rsedge.input_size": "[32, 32]",
            "rsedge.mean": json.dumps(MEAN), "rsedge.std": json.dumps(STD), "rsedge.layout": "NCHW",
            "rsedge.color": "RGB", "rsedge.resize": "resize", "rsedge.precision": "fp32"}


def make_seg_onnx(path, batch="batch", overlap=8):
    """A 1x1 Conv picking channels: the logits are the normalized G, R, B, so the class is the brightest
    channel (field: green, road: red, water: blue; the same mean/std on every channel keeps the order)."""
    from onnx import TensorProto, helper, numpy_helper, save

    weight = np.eye(3, dtype=np.float32)[[1, 0, 2]].reshape(3, 3, 1, 1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["logits"], name="classifier")], "tiny_segmenter",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3, 32, 32])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(3, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="rsedge-tests")
    model.ir_version = 8
    helper.set_model_props(model, seg_props(overlap))
    save(model, str(path))
    return str(path)


def paint(classes, seed):
    """An RGB image whose brightest channel at each pixel is the class there: water is blue, and so on."""
    rng = np.random.RandomState(seed)
    image = rng.randint(0, 90, size=classes.shape + (3,)).astype(np.uint8)
    channel = np.array([1, 0, 2])[classes]  # field: green, road: red, water: blue
    np.put_along_axis(image, channel[..., None], rng.randint(150, 256, size=classes.shape + (1,)).astype(np.uint8),
                      axis=2)
    return image


def scenes():
    """Two tiles of odd sizes (one smaller than the 32x32 window) and what the model predicts on them."""
    a = np.zeros((45, 70), np.int64)
    a[:30, 30:] = 1
    a[30:] = 2
    b = np.full((20, 33), 2, np.int64)
    b[:10, :10] = 0
    b[15:] = 0  # painted as field; its truth is unlabelled below
    return [paint(a, 1), paint(b, 2)], [a.astype(np.uint8), b.astype(np.uint8)]


def write_eval(directory, images, masks):
    os.makedirs(str(directory), exist_ok=True)
    flat, targets = seg.pack_eval_set(images, masks)
    np.save(os.path.join(str(directory), "images.npy"), flat)
    for name, array in targets.items():
        np.save(os.path.join(str(directory), name), array)
    return {"images": "eval/images.npy", "masks": "eval/masks.npy", "shapes": "eval/shapes.npy"}


def wrong_truth(masks):
    """The hand-computed case: 50 pixels of tile 0 are truly road where field is predicted, and the
    bottom 5 rows of tile 1 (predicted field) are unlabelled.

    Confusion (rows truth): field [950, 0, 0], road [50, 1200, 0], water [0, 0, 1445]: IoU field
    950 / 1000, road 1200 / 1250, water 1; 165 pixels ignored."""
    a, b = masks[0].copy(), masks[1].copy()
    a[:5, :10] = 1
    b[15:] = 255
    return [a, b]


@pytest.fixture
def onnx_model(tmp_path):
    pytest.importorskip("onnx", reason="builds the test model")
    pytest.importorskip("onnxruntime")
    return make_seg_onnx(tmp_path / "seg.onnx")


def test_pack_and_unpack_round_trip_with_mmap_and_limit(tmp_path):
    images, masks = scenes()
    flat, targets = seg.pack_eval_set(images, masks)
    assert flat.dtype == np.uint8 and flat.shape == (45 * 70 * 3 + 20 * 33 * 3,)
    assert targets["masks.npy"].dtype == np.uint8 and targets["shapes.npy"].tolist() == [[45, 70], [20, 33]]
    entry = write_eval(tmp_path / "eval", images, masks)
    task = tasks.get_task("segmentation")
    got_images, got_masks = task.load_eval(str(tmp_path), entry)
    assert isinstance(got_images[0], np.memmap) or isinstance(got_images[0].base, np.memmap)
    for a, b in zip(got_images + got_masks, images + masks):
        assert np.array_equal(a, b)
    assert len(task.load_eval(str(tmp_path), entry, limit=1)[0]) == 1
    assert len(task.load_targets(str(tmp_path), entry)) == 2
    _, wide = seg.pack_eval_set([images[1]], [np.full((20, 33), 300, np.int64)])
    assert wide["masks.npy"].dtype == np.uint16
    with pytest.raises(ValueError, match="mask shape"):
        seg.pack_eval_set(images, [masks[1], masks[0]])
    with pytest.raises(RuntimeToolError, match="inconsistent"):
        seg.unpack_eval_set(flat[:-3], targets["masks.npy"], targets["shapes.npy"])


def test_segmentation_metadata_keys_survive_normalization():
    meta = preprocess.normalize_metadata(seg_props())
    assert meta["task"] == "segmentation" and meta["colors"] == COLORS and meta["ignore_index"] == 255
    assert meta["overlap"] == 8 and meta["input_size"] == [32, 32]
    assert preprocess.normalize_metadata(preprocess.to_metadata_props(meta)) == meta
    assert preprocess.normalize_metadata({"colors": "null", "overlap": 0})["colors"] is None
    with pytest.raises(RuntimeToolError, match="rsedge.overlap must be an integer"):
        preprocess.normalize_metadata({"rsedge.overlap": "eight"})


def test_decode_agreement_and_summary():
    task = tasks.get_task("segmentation")
    logits = np.zeros((2, 3, 4, 4), np.float32)
    logits[:, 2, :, 2:] = 1.0
    pred = task.decode({"logits": logits}, {})
    assert pred.dtype == np.uint8 and pred.shape == (2, 4, 4) and pred[0, 0].tolist() == [0, 0, 2, 2]
    other = logits.copy()
    other[0, 1, 0, 0] = 5.0
    assert task.agreement({"logits": logits}, {"logits": other}, {}) == 1 - 1 / 32.0
    line = task.summary({"miou": 0.5, "global_accuracy": 0.75, "mean_bf": None, "n": 3})
    assert line == "mIoU 50.00 %, global accuracy 75.00 %, mean BF n/a on 3 images"
    with pytest.raises(RuntimeToolError, match="carries no rsedge.classes"):
        task.accumulator({})


def test_sliding_window_evaluation_of_whole_tiles(onnx_model):
    from rsedge.runtime.backends import open_runner

    images, masks = scenes()
    task = tasks.get_task("segmentation")
    runner = open_runner(onnx_model)
    try:
        starts = []
        perfect = evaluate.evaluate_eval_set(runner, images, masks, task=task, options=EvalOptions(
            batch=4, observe=lambda start, outputs: starts.append((start, outputs["logits"].shape[0]))))
        result = evaluate.evaluate_eval_set(runner, images, wrong_truth(masks), options=EvalOptions(batch=3))
    finally:
        runner.close()
    assert perfect["miou"] == 1.0 and perfect["global_accuracy"] == 1.0 and perfect["mean_bf"] == 1.0
    assert perfect["task"] == "segmentation" and perfect["n"] == 2 and perfect["windows"] == 6 + 2
    assert starts == [(0, 4), (4, 2), (6, 2)]  # windows in order, chunked per image by the batch
    assert result["confusion"] == [[950, 0, 0], [50, 1200, 0], [0, 0, 1445]]
    assert result["miou"] == pytest.approx((0.95 + 0.96 + 1.0) / 3)
    assert result["global_accuracy"] == pytest.approx(3595 / 3645.0)
    assert result["mean_accuracy"] == pytest.approx((1.0 + 0.96 + 1.0) / 3)
    assert result["ignored"] == 165 and result["pixels"] == 3645
    assert result["per_class"]["road"]["iou"] == pytest.approx(0.96) and 0 < result["mean_bf"] < 1


def test_fixed_batch_models_are_padded_and_patches_go_through_the_generic_loop(tmp_path):
    pytest.importorskip("onnx", reason="builds the test model")
    pytest.importorskip("onnxruntime")
    from rsedge.runtime.backends import open_runner

    images, masks = scenes()
    runner = open_runner(make_seg_onnx(tmp_path / "b2.onnx", batch=2, overlap=0))
    try:
        whole = evaluate.evaluate_eval_set(runner, images, wrong_truth(masks), options=EvalOptions(batch=8))
        patches = np.stack([seg.normalize_image(images[0][:32, y:y + 32], seg.window_plan(runner.metadata)[0])
                            for y in (0, 32, 38)])
        truth = np.stack([masks[0][:32, y:y + 32] for y in (0, 32, 38)])
        generic = evaluate.evaluate_arrays(runner, patches, truth, batch=2)
    finally:
        runner.close()
    assert whole["confusion"] == [[950, 0, 0], [50, 1200, 0], [0, 0, 1445]] and whole["windows"] == 3 * 2 + 2
    assert generic["task"] == "segmentation" and generic["n"] == 3 and generic["miou"] == 1.0


def _bundle(directory):
    from rsedge.runtime.bundles.manifest import write_manifest

    os.makedirs(str(directory))
    make_seg_onnx(directory / "model_fp32.onnx")
    make_seg_onnx(directory / "model_int8.onnx")
    images, masks = scenes()
    entry = write_eval(directory / "eval", images, wrong_truth(masks))
    meta = preprocess.normalize_metadata(seg_props())
    (directory / "preprocess.json").write_text(json.dumps(meta))
    (directory / "labels.json").write_text(json.dumps({"classes": CLASSES}))
    write_manifest(str(directory), {
        "variants": [{"name": "fp32", "onnx": "model_fp32.onnx", "precision": "fp32"},
                     {"name": "int8", "onnx": "model_int8.onnx", "precision": "int8"}],
        "preprocess": "preprocess.json", "labels": "labels.json", "eval": dict(entry, count=2)})
    return directory


def test_rsedge_bench_evaluates_a_segmentation_bundle_and_saves_predictions(tmp_path, capsys, no_tensorrt):
    pytest.importorskip("onnx", reason="builds the test models")
    pytest.importorskip("onnxruntime")
    Image = pytest.importorskip("PIL.Image")
    bundle = _bundle(tmp_path / "bundle")
    out = tmp_path / "preds"
    rc = cli.main([str(bundle), "--json", str(tmp_path / "r.json"), "--save-predictions", str(out)] + FAST)
    err = capsys.readouterr().err
    assert rc == 0, err
    fp32, int8 = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert fp32["accuracy"]["miou"] == pytest.approx(0.97) and fp32["accuracy"]["ignored"] == 165
    assert int8["check"]["agreement"] == 1.0 and int8["check"]["images"] == 8 and int8["check"]["passed"]
    assert "mIoU 97.00 %, global accuracy 98.63 %" in err
    _, masks = scenes()
    for run in ("bundle_fp32_onnx", "bundle_int8_onnx"):
        index = json.loads((out / run / "predictions.json").read_text())
        assert [f["file"] for f in index["files"]] == ["0000.png", "0001.png"] and index["classes"] == CLASSES
        for f, expected in zip(index["files"], masks):
            with Image.open(str(out / run / f["file"])) as img:
                assert img.mode == "P" and img.getpalette()[:9] == sum(COLORS, [])
                assert np.array_equal(np.asarray(img), expected)


def test_predictions_are_npy_without_pillow(onnx_model, tmp_path, monkeypatch):
    from rsedge.runtime.backends import open_runner

    monkeypatch.setattr(seg, "_pillow", lambda: None)
    images, masks = scenes()
    runner = open_runner(onnx_model)
    try:
        result = evaluate.evaluate_eval_set(runner, images, masks, options=EvalOptions(
            save_predictions=str(tmp_path / "p")))
    finally:
        runner.close()
    assert result["predictions"]["count"] == 2
    assert np.array_equal(np.load(str(tmp_path / "p" / "0001.npy")), masks[1])
    assert json.loads((tmp_path / "p" / "predictions.json").read_text())["files"][1]["file"] == "0001.npy"


def test_eval_folder_on_a_segmentation_model_is_one_clear_error_before_benchmarking(onnx_model, tmp_path, capsys):
    assert cli.main([onnx_model, "--eval", str(tmp_path)] + FAST) == 2
    err = capsys.readouterr().err
    assert "is a segmentation model: it is evaluated on a bundle's evaluation set" in err
    assert err.splitlines()[0] == "== seg.onnx" and len(err.splitlines()) == 2 and "Traceback" not in err


def test_a_bundle_missing_its_masks_fails_verification_naming_them(tmp_path):
    pytest.importorskip("onnx", reason="builds the test models")
    from rsedge.runtime.bundles.manifest import verify_manifest, write_manifest
    from rsedge.runtime.errors import ManifestError

    bundle = _bundle(tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    os.remove(str(bundle / "eval" / "masks.npy"))
    write_manifest(str(bundle), {k: v for k, v in manifest.items() if k not in ("format", "created", "files")})
    with pytest.raises(ManifestError, match="referenced but not listed in the manifest: eval/masks.npy"):
        verify_manifest(str(bundle))
