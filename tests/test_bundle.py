import json
import tarfile

import numpy as np
import pytest

from rsedge.export.bundle import bundle_run
from rsedge.export.onnx_export import run_onnx
from rsedge.runtime.bundles.manifest import verify_manifest
from rsedge.runtime.errors import ManifestError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, trained, synth_data):
    out = tmp_path_factory.mktemp("b") / "bundle"
    # 18 validation images: one image is 5.6 points, so a 6-point budget allows one image lost (at 5 points
    # the guard allowed none and ended with every node in float: a file it now rejects)
    result = bundle_run(trained, out, data=synth_data, calib_size=32, eval_size=36, max_drop=6.0, tar=True,
                        log=lambda m: None)
    return out, result


def test_bundle_layout_and_manifest(bundle):
    out, result = bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "rsedge-bundle/1"
    files = set(manifest["files"])
    assert {"model_fp32.onnx", "model_int8_qdq.onnx", "model_int8_cpu.onnx", "eval/images.npy", "eval/labels.npy",
            "labels.json", "preprocess.json"} <= files
    assert any(f.startswith("calib/calib_") for f in files)
    assert [(v["name"], v.get("target")) for v in manifest["variants"]] == [
        ("fp32", None), ("int8-qdq", "tensorrt"), ("int8-cpu", "onnxruntime")]
    assert manifest["rejected_variants"] == []
    assert manifest["variants"][2]["label"] == "int8-qdq-u8s8" and manifest["variants"][2]["int8_nodes"] == "21/21"
    guard = manifest["export"]["int8_guard"]
    assert guard["int8-qdq"]["status"] == guard["int8-cpu"]["status"] == "written"
    assert guard["int8-cpu"]["budget_images"] is not None and guard["int8-cpu"]["quantized_fraction"] == 1.0
    assert {"torch", "onnxruntime"} <= set(manifest["versions"])
    verify_manifest(str(out))
    images, labels = np.load(out / "eval" / "images.npy"), np.load(out / "eval" / "labels.npy")
    assert images.shape == (36, 3, 32, 32) and images.dtype == np.float32 and labels.dtype == np.int64
    assert sorted(set(labels.tolist())) == list(range(6))
    fp32_top1 = float(np.mean(run_onnx(out / "model_fp32.onnx", images, batch=8).argmax(1) == labels))
    assert fp32_top1 > 1 / 6  # a trained model, not chance
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["input_size"] == [32, 32] and len(pre["classes"]) == 6
    with tarfile.open(result["archive"]) as t:
        assert "bundle/manifest.json" in t.getnames()


def test_a_flipped_byte_in_any_file_is_named(bundle, tmp_path):
    import shutil

    out, _ = bundle
    manifest = json.loads((out / "manifest.json").read_text())
    for rel in manifest["files"]:
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(out, copy)
        target = copy / rel
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        with pytest.raises(ManifestError, match=rel.replace(".", r"\.")):
            verify_manifest(str(copy))
        shutil.rmtree(copy)


def test_truncated_and_missing_files_are_named(bundle, tmp_path):
    import shutil

    out, _ = bundle
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    onnx_file = copy / "model_int8_qdq.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:100])
    (copy / "labels.json").unlink()
    with pytest.raises(ManifestError, match="labels.json") as e:
        verify_manifest(str(copy))
    assert "model_int8_qdq.onnx" in str(e.value) and "truncated" in str(e.value)


def test_device_runtime_evaluates_the_bundle(bundle, tmp_path):
    from rsedge.runtime.cli import main

    out, _ = bundle
    report = tmp_path / "r.json"
    assert main([str(out), "--duration", "0.1", "--iterations", "3", "--warmup", "0.02", "--json", str(report),
                 "--quiet"]) == 0
    doc = json.loads(report.read_text())
    # no TensorRT here: ONNX Runtime runs fp32 and the variant made for it, not the TensorRT one
    assert [r["label"] for r in doc["runs"]] == ["bundle:fp32 (onnx)", "bundle:int8-cpu (onnx)"]
    assert doc["runs"][1]["precision"] == "int8-qdq-u8s8" and doc["runs"][1]["accuracy"]["top1"] is not None


def test_existing_folder_is_refused(tmp_path, trained, synth_data):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        bundle_run(trained, tmp_path / "x", data=synth_data, log=lambda m: None)
