import json
import tarfile

import numpy as np
import pytest

from rsedge.export.bundle import bundle_run
from rsedge.export.onnx_export import run_onnx
from rsedge.runtime.errors import ManifestError
from rsedge.runtime.manifest import verify_manifest


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, trained, synth_data):
    out = tmp_path_factory.mktemp("b") / "bundle"
    result = bundle_run(trained, out, data=synth_data, calib_size=32, eval_size=36, max_drop=5.0, tar=True,
                        log=lambda m: None)
    return out, result


def test_bundle_layout_and_manifest(bundle):
    out, result = bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "rsedge-bundle/1"
    files = set(manifest["files"])
    assert {"model_fp32.onnx", "model_int8_qdq.onnx", "eval/images.npy", "eval/labels.npy", "labels.json",
            "preprocess.json"} <= files
    assert any(f.startswith("calib/calib_") for f in files)
    assert [v["name"] for v in manifest["variants"]] == ["fp32", "int8-qdq"]
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
    text = report.read_text()
    assert "int8-qdq" in text and "top1" in text


def test_existing_folder_is_refused(tmp_path, trained, synth_data):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        bundle_run(trained, tmp_path / "x", data=synth_data, log=lambda m: None)
