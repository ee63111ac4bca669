import json
import os

import pytest

from rsedge.runtime.bundles.manifest import FORMAT, sha256_file, verify_manifest, write_manifest
from rsedge.runtime.errors import ManifestError

EXTRA = {"variants": [{"name": "fp32", "onnx": "model_fp32.onnx", "precision": "fp32"}],
         "preprocess": "preprocess.json", "eval": {"images": "eval/images.npy", "labels": "eval/labels.npy"}}


@pytest.fixture
def bundle(tmp_path):
    d = tmp_path / "bundle"
    (d / "eval").mkdir(parents=True)
    (d / "model_fp32.onnx").write_bytes(os.urandom(4096))
    (d / "preprocess.json").write_text('{"input_size": [64, 64]}')
    (d / "eval" / "images.npy").write_bytes(os.urandom(1000))
    (d / "eval" / "labels.npy").write_bytes(os.urandom(100))
    write_manifest(str(d), EXTRA)
    return d


def test_write_and_verify(bundle):
    doc = json.loads((bundle / "manifest.json").read_text())
    assert doc["format"] == FORMAT and doc["created"].endswith("Z")
    assert sorted(doc["files"]) == ["eval/images.npy", "eval/labels.npy", "model_fp32.onnx", "preprocess.json"]
    assert doc["files"]["model_fp32.onnx"] == {"sha256": sha256_file(str(bundle / "model_fp32.onnx")),
                                               "bytes": 4096}
    assert doc["variants"] == EXTRA["variants"]
    verified = verify_manifest(str(bundle))
    assert verified["verification"] == {"files": 4, "unlisted": []}
    assert not [n for n in os.listdir(str(bundle)) if n.endswith(".tmp")]


@pytest.mark.parametrize("rel", ["model_fp32.onnx", "preprocess.json", "eval/images.npy", "eval/labels.npy"])
def test_a_flipped_byte_anywhere_names_the_file(bundle, rel):
    path = bundle / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError) as e:
        verify_manifest(str(bundle))
    assert rel in str(e.value) and "SHA-256" in str(e.value)


def test_missing_truncated_and_tampered_are_all_named_at_once(bundle):
    (bundle / "eval" / "labels.npy").unlink()
    data = (bundle / "model_fp32.onnx").read_bytes()
    (bundle / "model_fp32.onnx").write_bytes(data[:100])
    (bundle / "preprocess.json").write_text('{"input_size": [32, 32]}')
    with pytest.raises(ManifestError) as e:
        verify_manifest(str(bundle))
    msg = str(e.value)
    assert "missing: eval/labels.npy" in msg
    assert "model_fp32.onnx (100 bytes, manifest says 4096: truncated)" in msg
    assert "preprocess.json" in msg


def test_engines_are_not_covered_and_extra_files_are_reported(bundle):
    (bundle / "engines").mkdir()
    (bundle / "engines" / "fp32-fp16-b1.engine").write_bytes(b"built on the device")
    (bundle / "README.txt").write_text("notes")
    verified = verify_manifest(str(bundle))
    assert verified["verification"]["unlisted"] == ["README.txt"]
    doc = write_manifest(str(bundle), EXTRA)
    assert "engines/fp32-fp16-b1.engine" not in doc["files"] and "README.txt" in doc["files"]


def test_damaged_manifest_and_dangling_references(bundle, tmp_path):
    doc = json.loads((bundle / "manifest.json").read_text())
    doc["variants"].append({"name": "int8", "onnx": "model_int8.onnx", "precision": "int8"})
    (bundle / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="model_int8.onnx"):
        verify_manifest(str(bundle))
    (bundle / "manifest.json").write_text("{ not json")
    with pytest.raises(ManifestError, match="damaged"):
        verify_manifest(str(bundle))
    with pytest.raises(ManifestError, match="not an rsedge bundle"):
        verify_manifest(str(tmp_path))


def test_paths_escaping_the_bundle_are_refused(bundle):
    doc = json.loads((bundle / "manifest.json").read_text())
    doc["files"]["../outside"] = {"sha256": "0" * 64, "bytes": 1}
    (bundle / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="outside the bundle"):
        verify_manifest(str(bundle))
