"""Detection through the host stages: train yolo_n on synthetic scenes (anchors fitted, EMA), evaluate,
export with the in-graph decode (+ EfficientNMS_TRT, INT8 guarded on mAP@0.5), bundle, and the
device's evaluation of the bundle, which must give the host's numbers; L_FA inside the boxes."""
import json

import numpy as np
import pytest
import torch

QUIET = {"progress": False, "log": lambda m: None}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from rsedge.trainer.synth_det import write_synthetic_detection

    root = tmp_path_factory.mktemp("detscenes")
    write_synthetic_detection(root, n_images=30, size=96, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def det_run(tmp_path_factory, scenes):
    from rsedge.trainer.run import train_run
    from rsedge.trainer.train import TrainConfig

    out = tmp_path_factory.mktemp("detrun")
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01, workers=0, seed=0)
    record = train_run(scenes, "yolo_n", out, img_size=96, val=0.0, test=0.2, cfg=cfg, **QUIET)
    return out, record


def test_training_fits_anchors_keeps_an_ema_and_writes_the_detection_report(det_run):
    from rsedge.trainer.modelfile import load_model, read_metadata

    out, record = det_run
    test = record["test"]
    assert set(test) >= {"map50", "map50_95", "per_class", "precision", "recall", "samples"}
    assert 0.0 <= test["map50_95"] <= test["map50"] <= 1.0 and test["samples"] == 6
    meta = read_metadata(out / "model.safetensors")
    anchors = np.asarray(meta["model_args"]["anchors"])
    assert anchors.shape == (3, 3, 2) and np.all(np.diff(anchors.prod(-1).ravel()) >= -1e-6)
    assert anchors.max() < 96  # fitted to 96 px scenes, not COCO's 640 px defaults
    model, _ = load_model(out / "model.safetensors")
    assert torch.allclose(model.anchors, torch.tensor(anchors, dtype=torch.float32))
    for name in ("metrics.json", "pr_curves.png", "detections.png", "results.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["map50"] == pytest.approx(test["map50"]) and "examples" not in metrics
    assert meta["conf_threshold"] == 0.25 and meta["eval_conf_threshold"] == 0.001


def test_eval_of_the_model_folder_repeats_the_test_numbers(det_run, scenes, tmp_path):
    from rsedge.trainer.run import eval_run

    out, record = det_run
    result = eval_run(out / "model.safetensors", scenes, tmp_path / "ev", batch_size=4, workers=0, **QUIET)
    assert result["map50"] == pytest.approx(record["test"]["map50"], abs=1e-9)


def test_eval_saves_coco_predictions_that_a_coco_tool_rescores(det_run, scenes, tmp_path):
    from faster_coco_eval import COCO, COCOeval_faster

    from rsedge.trainer.run import eval_run

    out, record = det_run
    saved = tmp_path / "pred"
    result = eval_run(out / "model.safetensors", scenes, tmp_path / "ev", batch_size=4, workers=0,
                      save_predictions=saved, **QUIET)
    truth = json.loads((saved / "ground_truth.json").read_text())
    names = [i["file_name"] for i in truth["images"]]
    assert len(names) == result["samples"] and all(n.startswith("images/") for n in names)
    gt = COCO(str(saved / "ground_truth.json"))
    dt = gt.loadRes(str(saved / "predictions.json"))
    ev = COCOeval_faster(gt, dt, "bbox", print_function=lambda *a: None)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    # predictions reaching into the letterbox padding are clipped to the image in the files (as on the device)
    assert ev.stats[1] == pytest.approx(result["map50"], abs=0.02)
    record_json = json.loads((tmp_path / "ev" / "record.json").read_text())
    assert "detections" not in record_json["result"] and "examples" not in record_json["result"]


def test_export_decodes_in_the_graph_guards_int8_on_map_and_appends_efficient_nms(det_run, tmp_path):
    import onnx

    from rsedge.export.run import export_run

    out, _ = det_run
    rec = export_run(out / "model.safetensors", tmp_path / "x", int8=True, max_drop=100.0, calib_size=16,
                     guard_images=8, **{"nms": "trt"}, log=lambda m: None)
    graph = onnx.load(str(tmp_path / "x" / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"ScatterND", "Range", "NonZero", "Shape"}
    assert [o.name for o in graph.output] == ["boxes", "scores"]
    assert rec["onnx"]["parity"]["max_abs_diff"] < 1e-2 and rec["onnx"]["parity"]["top1_agreement"] == 1.0
    nms = onnx.load(str(tmp_path / "x" / "model_nms_trt.onnx"))
    assert nms.graph.node[-1].op_type == "EfficientNMS_TRT"
    assert [o.name for o in nms.graph.output] == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    guard = rec["int8"]
    assert guard["metric"] == "map50" and guard["status"] == "written" and "fp32_map50" in guard
    q = onnx.load(str(tmp_path / "x" / "model_int8.onnx")).graph
    producer = {out: n.op_type for n in q.node for out in n.output}
    decode = [n for n in q.node if not n.name.startswith("/model/") and n.op_type in ("Sigmoid", "Mul", "Add", "Pow")]
    assert decode and not any(producer.get(i) == "DequantizeLinear" for n in decode for i in n.input)


def test_device_scores_the_bundle_as_the_host(det_run, tmp_path, no_tensorrt):
    from rsedge.export.bundle import bundle_run
    from rsedge.runtime import cli as bench_cli

    out, record = det_run
    bundle_run(out / "model.safetensors", tmp_path / "b", eval_size=50, calib_size=8, max_drop=None, log=lambda m: None)
    assert bench_cli.main([str(tmp_path / "b"), "--json", str(tmp_path / "r.json"), "--warmup", "0", "--iterations",
                           "2", "--duration", "0", "--no-power", "--save-predictions", str(tmp_path / "p")]) == 0
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    fp32 = next(r for r in runs if r["label"].endswith("fp32 (onnx)"))
    assert fp32["accuracy"]["map50"] == pytest.approx(record["test"]["map50"], abs=2e-3)
    preds = next(p for p in (tmp_path / "p").iterdir() if "fp32" in p.name)
    truth = json.loads((preds / "ground_truth.json").read_text())
    assert len(truth["images"]) == record["test"]["samples"] and truth["categories"][0]["id"] == 1
    assert isinstance(json.loads((preds / "predictions.json").read_text()), list)


def test_target_regions_are_the_boxes_at_each_detection_layer_and_lfa_averages_the_layers():
    from rsedge.compress.lfa import feature_attention, lfa
    from rsedge.trainer.tasks import get_task

    feats = [torch.ones(1, 2, 4, 4), torch.ones(1, 2, 2, 2)]

    def fm(images):
        return None, [f.expand(len(images), -1, -1, -1) for f in feats]

    images = torch.zeros(1, 3, 32, 32)
    target = torch.tensor([[0, 0.0, 0.0, 15.0, 15.0]])  # the top-left quarter of a 32 px image
    masks = get_task("detection").target_regions(fm, images, [target])
    assert masks[0][0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert masks[1][0].tolist() == [[1, 0], [0, 0]]
    fa = feature_attention(fm, images, masks)
    assert fa == [8.0, 2.0]  # 2 channels x 4 cells, 2 channels x 1 cell
    assert lfa([6.0, 2.0], fa) == pytest.approx((0.25 + 0.0) / 2)
    with pytest.raises(ValueError, match="compares 1 feature map"):
        lfa([0.0], fa)  # a pruned model whose layers were not found is an error, not an L_FA of 1/2


def test_ema_follows_the_weights_early_and_round_trips_through_a_checkpoint():
    from torch import nn

    from rsedge.trainer.ema import ModelEMA

    model = nn.Linear(2, 2)
    ema = ModelEMA(model, tau=10.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    d = ema.decay()
    assert 0 < d < 0.1
    expected = d * (model.weight - 1.0) + (1 - d) * model.weight
    assert torch.allclose(ema.module.weight, expected)
    again = ModelEMA(nn.Linear(2, 2))
    again.restore(ema.tensors(), ema.updates)
    assert again.updates == 1 and torch.equal(again.module.weight, ema.module.weight)


def test_yolo_through_every_stage_from_the_cli(tmp_path, capsys):
    """The README's detection walk-through, shortened (CI's detection smoke): data synth -> train ->
    sparse-train (l1rr) -> prune (l1rr, L_FA target, residual reconstruction) -> finetune -> bundle
    (export + INT8) -> rsedge-bench --save-predictions (export's own options: the test above)."""
    from rsedge.cli.main import main
    from rsedge.runtime import cli as bench_cli

    d, r = str(tmp_path / "scenes"), tmp_path / "runs"
    quick = ["--batch-size", "8", "--workers", "0", "--quiet"]
    assert main(["data", "synth", "--task", "detect", "--out", d, "--images", "24", "--size", "64"]) == 0
    assert main(["train", "--data", d, "--model", "yolo_n", "--img-size", "64", "--epochs", "1", "--act", "relu",
                 "--out", str(r / "base"), *quick]) == 0
    assert main(["sparse-train", "--model", str(r / "base/model.safetensors"), "--data", d, "--method", "l1rr",
                 "--epochs", "1", "--out", str(r / "sparse"), *quick]) == 0
    assert main(["prune", "--model", str(r / "sparse/model.safetensors"), "--method", "l1rr", "--target-lfa", "0.05",
                 "--coupling", "reconstruct", "--lfa-images", "8", "--data", d, "--out", str(r / "pruned"),
                 *quick]) == 0
    assert main(["finetune", "--model", str(r / "pruned/model.safetensors"), "--data", d, "--epochs", "1",
                 "--out", str(r / "ft"), *quick]) == 0
    assert main(["bundle", "--model", str(r / "ft/model.safetensors"), "--out", str(r / "bundle"),
                 "--calib-size", "8", "--max-drop", "-1"]) == 0
    assert bench_cli.main([str(r / "bundle"), "--warmup", "0", "--iterations", "2", "--duration", "0",
                           "--no-power", "--json", str(r / "bench.json"), "--save-predictions", str(r / "p")]) == 0
    runs = json.loads((r / "bench.json").read_text())["runs"]
    assert runs and all(run["accuracy"]["map50"] is not None for run in runs)
    pruned = json.loads((r / "pruned/record.json").read_text())
    assert len(pruned["reconstructed_adds"]) == 7 and pruned["after"]["params"] < pruned["before"]["params"]
    assert abs(pruned["feature_attention"]["chosen"]["lfa"]) <= 0.05


@pytest.mark.parametrize("method", ["taylor", pytest.param("cap", marks=pytest.mark.slow), "fpgm"])
def test_the_other_criteria_prune_the_detector_and_keep_its_detection_convs(det_run, scenes, tmp_path, method):
    """Taylor and CAP differentiate the detection loss (with the model's anchors); no criterion touches
    the detect convs' outputs (3 anchors x (5 + 3 classes))."""
    from rsedge.compress.prune import prune_run
    from rsedge.trainer.modelfile import load_model

    out, _ = det_run
    r = prune_run(out / "model.safetensors", tmp_path / method, method=method, ratio=0.3, data=scenes, batch_size=8,
                  workers=0, taylor_batches=1, cap_samples=8, **QUIET)
    model, _ = load_model(tmp_path / method / "model.safetensors")
    assert r["after"]["params"] < 0.7 * r["before"]["params"]
    assert [conv.out_channels for conv in model.detect] == [24, 24, 24]
