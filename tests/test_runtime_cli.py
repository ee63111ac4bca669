"""rsedge-bench end to end on CPU: single models, several models, bundles, and clear errors."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import runtime_fakes as H

from rsedge.runtime import cli
from rsedge.runtime.bundles.bundle import Bundle, engine_name, ensure_engines, plan_engines

pytest.importorskip("onnx", reason="the onnx package builds the test models (host-only dependency)")
pytest.importorskip("onnxruntime", reason="rsedge-bench runs ONNX files with ONNX Runtime here")


from runtime_fakes import FAST


def test_help_explains_options_with_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for words in ("--warmup", "(default: 0.2)", "--iterations", "(default: 10)", "--duration", "(default: 3.0)",
                  "--cuda-graph", "--eval", "--json", "examples:"):
        assert words in text


def test_two_models_one_table_and_files(tmp_path, capsys):
    a = H.make_classifier_onnx(str(tmp_path / "a.onnx"), channels=4)
    b = H.make_classifier_onnx(str(tmp_path / "b.onnx"), channels=2)
    out = tmp_path / "out"
    rc = cli.main([a, b, "--batch", "1,2", "--threads", "1", "--json", str(out / "r.json"), "--csv",
                   str(out / "r.csv"), "--md", str(out / "r.md")] + FAST)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2 + 4 + 1 and "speed-up" in lines[0] and "1.00x" in lines[2]
    for header in ("mean ms", "median ms", "min ms", "max ms", "thr img/s (wall)"):
        assert header in lines[0]
    assert lines[-1].startswith("thr img/s (wall) = batch x timed runs / wall-clock time")
    assert "onnxruntime" in captured.err and "is an ONNX model" in captured.err  # says what it picked and why
    doc = json.loads((out / "r.json").read_text())
    assert doc["schema"] == "rsedge-bench/1" and len(doc["runs"]) == 2 and len(doc["comparison"]) == 4
    assert doc["command"][0] == "rsedge-bench" and doc["runs"][1]["results"][1]["batch"] == 2
    assert (out / "r.csv").read_text().startswith("label,model,backend")
    assert "# rsedge-bench results" in (out / "r.md").read_text()


def test_eval_folder_needs_a_folder_for_single_models(tmp_path, capsys):
    a = H.make_classifier_onnx(str(tmp_path / "a.onnx"))
    assert cli.main([a, "--eval"] + FAST) == 2
    assert "--eval without a folder needs a bundle" in capsys.readouterr().err


def test_clear_errors(tmp_path, capsys):
    assert cli.main([str(tmp_path / "missing.onnx")] + FAST) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert cli.main([str(tmp_path / "plain")] + FAST) == 2
    assert "not an rsedge bundle" in capsys.readouterr().err
    a = H.make_classifier_onnx(str(tmp_path / "a.onnx"))
    assert cli.main([a, "--backend", "tensorrt"] + FAST) == 2
    assert "rsedge build" in capsys.readouterr().err


def test_bundle_without_tensorrt_runs_the_onnx_variants(tmp_path, capsys, no_tensorrt):
    bundle = tmp_path / "bundle"
    H.make_bundle(str(bundle))
    rc = cli.main([str(bundle), "--eval", "--json", str(tmp_path / "b.json")] + FAST)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "files verified" in captured.err and "with ONNX Runtime instead" in captured.err
    doc = json.loads((tmp_path / "b.json").read_text())
    labels = [r["label"] for r in doc["runs"]]
    assert labels == ["bundle:fp32 (onnx)", "bundle:int8-qdq (onnx)"]
    assert doc["runs"][0]["accuracy"]["top1"] == 1.0 and doc["runs"][0]["accuracy"]["n"] == 12
    assert doc["runs"][1]["precision"] == "int8-qdq" and doc["runs"][1]["accuracy"]["n"] == 12


def test_tampered_bundle_is_refused_naming_the_file(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    H.make_bundle(str(bundle))
    path = bundle / "model_int8_qdq.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cli.main([str(bundle)] + FAST) == 2
    err = capsys.readouterr().err
    assert "model_int8_qdq.onnx" in err and "failed verification" in err


def test_bundle_with_fake_tensorrt_builds_then_reuses_engines(tmp_path, capsys, monkeypatch):
    bundle = tmp_path / "bundle"
    H.make_bundle(str(bundle))
    cuda = H.FakeCuda()
    trt = H.make_fake_trt("8.6.2.3")
    H.install_fake_tensorrt(monkeypatch, trt, cuda)
    rc = cli.main([str(bundle), "--batch", "1,4", "--eval", "--json", str(tmp_path / "r.json")] + FAST)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["bundle:fp32/fp32", "bundle:fp32/fp16", "bundle:fp32/int8",
                                                 "bundle:int8-qdq/int8"]
    assert all(r["backend"] == "tensorrt" for r in doc["runs"])
    assert doc["runs"][2]["precision"] == "int8" and "compute_ms" in doc["runs"][0]["results"][0]
    assert doc["runs"][0]["accuracy"]["n"] == 12
    engines = sorted(os.listdir(str(bundle / "engines")))
    assert "fp32-fp16-b4.engine" in engines and "fp32-fp16-b4.json" in engines
    assert any(n.startswith("calib-model_fp32") for n in engines) and any(n.startswith("timing-") for n in engines)
    rc = cli.main([str(bundle), "--batch", "1,4"] + FAST)
    assert rc == 0 and captured.err.count(": building engines") == 4 and "reusing engines/fp32-fp16-b4.engine" in \
        capsys.readouterr().err


def test_plan_engines_per_board(tmp_path):
    H.make_bundle(str(tmp_path / "b"))
    bundle = Bundle.open(str(tmp_path / "b"))
    orin = {"fast_fp16": True, "fast_int8": True, "calibrators": True, "tensorrt_version": "8.6.2"}
    plan = plan_engines(bundle, orin, (1, 8, 8))
    assert [(p["variant"], p["precision"], p["int8_from"], p["skip"]) for p in plan] == [
        ("fp32", "fp32", None, None), ("fp32", "fp16", None, None), ("fp32", "int8", "calib", None),
        ("int8-qdq", "int8", "qdq", None)]
    assert plan[1]["engine"].endswith(os.path.join("engines", engine_name("fp32", "fp16", 8)))
    tx2 = dict(orin, fast_int8=False)
    skipped = [p for p in plan_engines(bundle, tx2, (1, 8, 8)) if p["skip"]]
    assert len(skipped) == 2 and all("no fast INT8" in p["skip"] for p in skipped)
    trt11 = dict(orin, calibrators=False, tensorrt_version="11.0")
    assert "no INT8 calibrators" in plan_engines(bundle, trt11, (1, 8, 8))[2]["skip"]
    only = plan_engines(bundle, orin, (1, 8, 8), precisions=["fp16"])
    assert [p["precision"] for p in only] == ["fp16"]


def test_ensure_engines_rebuilds_for_another_tensorrt(tmp_path):
    H.make_bundle(str(tmp_path / "b"))
    bundle = Bundle.open(str(tmp_path / "b"))
    device = {"name": "Orin", "compute_capability": "8.7"}
    caps = {"fast_fp16": True, "fast_int8": True, "calibrators": True, "tensorrt_version": "8.6.2",
            "device": device}
    built = []

    def fake_build(onnx, engine, **kw):
        from rsedge.runtime.build import sidecar

        built.append((os.path.basename(onnx), kw["precision"], kw["int8_from"]))
        os.makedirs(os.path.dirname(engine), exist_ok=True)
        with open(engine, "wb") as f:
            f.write(b"engine")
        plan = {"precision": kw["precision"], "requested": kw["precision"], "int8_from": kw["int8_from"],
                "flags": [], "fallback": None}
        sidecar.write_sidecar(engine, sidecar.make_sidecar(
            engine, caps["tensorrt_version"], device, plan, [], [], {"batch": list(kw["batch"])}, 0.1, onnx,
            sidecar.sha256_file(onnx), kw["metadata"]))

    plan = ensure_engines(bundle, caps, (1, 8, 8), precisions=["fp16", "int8"], build=fake_build)
    assert [p["status"] for p in plan] == ["built", "built", "built"]
    assert built[1] == ("model_fp32.onnx", "int8", "calib")
    assert ensure_engines(bundle, caps, (1, 8, 8), precisions=["fp16", "int8"], build=fake_build)[0]["status"] == \
        "reused"
    caps["tensorrt_version"] = "10.3.0"
    plan = ensure_engines(bundle, caps, (1, 8, 8), precisions=["fp16"], build=fake_build)
    assert plan[0]["status"] == "built" and "built elsewhere" in plan[0]["reason"]
    plan = ensure_engines(bundle, caps, (1, 4, 4), precisions=["fp16"], build=fake_build)
    assert plan[0]["engine"].endswith("fp32-fp16-b4.engine") and plan[0]["status"] == "built"


def test_quiet_prints_only_the_table(tmp_path, capsys):
    a = H.make_classifier_onnx(str(tmp_path / "a.onnx"))
    assert cli.main([a, "--quiet"] + FAST) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 3 and captured.err == ""


def test_two_exports_of_the_same_name_get_distinct_labels(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    (tmp_path / "pruned").mkdir()
    a = H.make_classifier_onnx(str(tmp_path / "base" / "model.onnx"), channels=4)
    b = H.make_classifier_onnx(str(tmp_path / "pruned" / "model.onnx"), channels=2)
    rc = cli.main([a, b, "--json", str(tmp_path / "r.json")] + FAST)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["base/model.onnx", "pruned/model.onnx"]
    rows = captured.out.splitlines()
    assert rows[2].startswith("base/model.onnx ") and rows[3].startswith("pruned/model.onnx ")


@pytest.mark.parametrize("order", ["eval-first", "bundle-first", "eval-equals"])
def test_eval_followed_by_a_bundle_runs_the_bundle(tmp_path, capsys, no_tensorrt, order):
    bundle = str(tmp_path / "bundle")
    H.make_bundle(bundle)
    argv = {"eval-first": ["--eval", bundle], "bundle-first": [bundle, "--eval"],
            "eval-equals": ["--eval=" + bundle]}[order]
    rc = cli.main(argv + ["--json", str(tmp_path / "r.json")] + FAST)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads((tmp_path / "r.json").read_text())
    labels = [r["label"] for r in doc["runs"]]
    assert labels[0] == "bundle:fp32 (onnx)" and all(label.startswith("bundle:") for label in labels)
    assert all(r["accuracy"]["n"] == 12 for r in doc["runs"])


def test_eval_dir_after_a_model_is_still_a_folder(tmp_path, capsys):
    a = H.make_classifier_onnx(str(tmp_path / "a.onnx"))
    folder = tmp_path / "val"
    for name in H.CLASSES:
        (folder / name).mkdir(parents=True)
        np.save(str(folder / name / "x.npy"), np.random.RandomState(0).randint(0, 256, (16, 16, 3)).astype(np.uint8))
    rc = cli.main([a, "--eval", str(folder), "--json", str(tmp_path / "r.json")] + FAST)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    accuracy = json.loads((tmp_path / "r.json").read_text())["runs"][0]["accuracy"]
    assert accuracy["n"] == 3 and set(accuracy["per_class"]) == set(H.CLASSES)


def _tar(archive, bundle, arcname):
    with tarfile.open(str(archive), "w:gz") as t:
        t.add(str(bundle), arcname=arcname)


def test_tar_gz_bundle_is_extracted_next_to_it_verified_and_reused(tmp_path, capsys, no_tensorrt):
    src = tmp_path / "host" / "bundle"
    H.make_bundle(str(src))
    device = tmp_path / "device"
    device.mkdir()
    archive = device / "bundle.tar.gz"
    _tar(archive, src, "bundle")
    rc = cli.main(["--eval", str(archive), "--json", str(tmp_path / "r.json")] + FAST)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "extracted into" in captured.err and "files verified" in captured.err
    assert (device / "bundle" / "manifest.json").is_file()
    assert sorted(p.name for p in device.iterdir()) == ["bundle", "bundle.tar.gz"]  # no staging folder left
    doc = json.loads((tmp_path / "r.json").read_text())
    labels = [r["label"] for r in doc["runs"]]
    assert labels[0] == "bundle:fp32 (onnx)" and all(label.startswith("bundle:") for label in labels)
    assert all(r["accuracy"]["n"] == 12 for r in doc["runs"])
    assert cli.main([str(archive)] + FAST) == 0
    assert "extracted before (same manifest)" in capsys.readouterr().err


def test_tar_gz_bundle_with_a_tampered_file_is_refused(tmp_path, capsys, no_tensorrt):
    src = tmp_path / "bundle"
    H.make_bundle(str(src))
    path = src / "model_fp32.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    out = tmp_path / "copy"
    out.mkdir()
    _tar(out / "b.tar.gz", src, "b")
    assert cli.main([str(out / "b.tar.gz")] + FAST) == 2
    err = capsys.readouterr().err
    assert "model_fp32.onnx" in err and "failed verification" in err


def test_tar_gz_bundle_does_not_overwrite_another_folder(tmp_path, capsys, no_tensorrt):
    H.make_bundle(str(tmp_path / "src"))
    _tar(tmp_path / "bundle.tar.gz", tmp_path / "src", "bundle")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "mine.txt").write_text("keep")
    assert cli.main([str(tmp_path / "bundle.tar.gz")] + FAST) == 2
    assert "does not hold the bundle" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["mine.txt"]


def _evil_archive(path, kind):
    data = b"x"
    with tarfile.open(str(path), "w:gz") as t:
        manifest = tarfile.TarInfo("b/manifest.json")
        manifest.size = 1
        t.addfile(manifest, io.BytesIO(data))
        if kind == "dotdot":
            info = tarfile.TarInfo("b/../../escaped.txt")
            info.size = 1
            t.addfile(info, io.BytesIO(data))
        elif kind == "absolute":
            info = tarfile.TarInfo("/tmp/rsedge-escaped.txt")
            info.size = 1
            t.addfile(info, io.BytesIO(data))
        else:
            info = tarfile.TarInfo("b/link")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            t.addfile(info)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_tar_gz_with_paths_outside_or_links_is_refused(tmp_path, capsys, kind):
    (tmp_path / "d").mkdir()
    archive = tmp_path / "d" / "b.tar.gz"
    _evil_archive(archive, kind)
    assert cli.main([str(archive)] + FAST) == 2
    assert "refused" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["b.tar.gz"]
    assert not (tmp_path / "escaped.txt").exists()


def test_archive_without_a_manifest_is_not_a_bundle(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.txt").write_text("a")
    _tar(tmp_path / "x.tar.gz", tmp_path / "x", "x")
    assert cli.main([str(tmp_path / "x.tar.gz")] + FAST) == 2
    assert "not an rsedge bundle" in capsys.readouterr().err


def test_read_only_folder_extracts_to_a_temporary_folder_removed_after(tmp_path, capsys, no_tensorrt, monkeypatch):
    from rsedge.runtime.bundles import archive as archive_mod

    H.make_bundle(str(tmp_path / "src"))
    _tar(tmp_path / "bundle.tar.gz", tmp_path / "src", "bundle")
    monkeypatch.setattr(archive_mod.os, "access", lambda path, mode: False)
    made = []
    real_mkdtemp = archive_mod.tempfile.mkdtemp

    def mkdtemp(**kw):
        made.append(real_mkdtemp(dir=str(tmp_path / "scratch"), **kw))
        return made[-1]

    (tmp_path / "scratch").mkdir()
    monkeypatch.setattr(archive_mod.tempfile, "mkdtemp", mkdtemp)
    rc = cli.main([str(tmp_path / "bundle.tar.gz"), "--json", str(tmp_path / "r.json")] + FAST)
    assert rc == 0, capsys.readouterr().err
    assert len(made) == 1 and not os.path.exists(made[0]) and not (tmp_path / "bundle").exists()
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["label"] == "bundle:fp32 (onnx)"


def test_model_file_without_a_host_loader_says_where_it_runs(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not used")
    assert cli.main([str(path)] + FAST) == 2
    assert "rsedge bench" in capsys.readouterr().err


def test_eval_with_a_missing_archive_names_the_archive(tmp_path, capsys):
    assert cli.main(["--eval", str(tmp_path / "bundle.tar.gz")] + FAST) == 2
    err = capsys.readouterr().err
    assert "bundle.tar.gz does not exist" in err


def test_two_bundles_of_the_same_name_get_distinct_labels(tmp_path, capsys, no_tensorrt):
    H.make_bundle(str(tmp_path / "old" / "bundle"))
    H.make_bundle(str(tmp_path / "new" / "bundle"))
    rc = cli.main([str(tmp_path / "old" / "bundle"), str(tmp_path / "new" / "bundle"), "--no-eval", "--json",
                   str(tmp_path / "r.json")] + FAST)
    assert rc == 0, capsys.readouterr().err
    labels = [r["label"] for r in json.loads((tmp_path / "r.json").read_text())["runs"]]
    assert "old/bundle:fp32 (onnx)" in labels and "new/bundle:fp32 (onnx)" in labels
    assert len(set(labels)) == len(labels)


def test_models_and_options_may_be_mixed(tmp_path):
    bundle = str(tmp_path / "bundle")
    H.make_bundle(bundle)
    args = cli.parse_args(cli.build_parser(), ["a.onnx", "--batch", "1,4", "b.onnx", "--eval", bundle])
    assert args.models == ["a.onnx", "b.onnx", bundle] and args.batch == [1, 4]
    args = cli.parse_args(cli.build_parser(), ["a.onnx", "--eval", str(tmp_path)])
    assert args.models == ["a.onnx"] and args.eval == str(tmp_path)  # a folder without manifest.json: --eval DIR


def test_bundle_on_a_tx2_says_loudly_that_it_has_no_int8(tmp_path, capsys, monkeypatch):
    """JetPack 4.6 (TensorRT 8.0.1) on a TX2: no INT8 engine, FP16 at best, and the report says so
    on stderr (even with --quiet), in the JSON and in the Markdown report."""
    bundle = tmp_path / "bundle"
    H.make_bundle(str(bundle))
    cuda = H.FakeCuda()
    cuda.device = dict(cuda.device, name="NVIDIA Tegra X2", compute_capability="6.2")
    trt = H.make_fake_trt("8.0.1.6", fast_int8=False)
    H.install_fake_tensorrt(monkeypatch, trt, cuda)
    rc = cli.main([str(bundle), "--batch", "1", "--no-eval", "--quiet", "--json", str(tmp_path / "r.json"),
                   "--md", str(tmp_path / "r.md")] + FAST)
    err = capsys.readouterr().err
    assert rc == 0, err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {r["precision"] for r in doc["runs"]} == {"fp32", "fp16"}
    assert "WARNING: NO INT8 on this GPU (NVIDIA Tegra X2, sm 6.2)" in err
    assert all("NO INT8" in r["warnings"][0] for r in doc["runs"])
    assert "**WARNING: NO INT8 on this GPU" in (tmp_path / "r.md").read_text()
