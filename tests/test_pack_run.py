"""`rsedge pack` on the trained resnet18 fixture (32 px): the measured CR, the round trip through the
numpy-only unpacker and ONNX Runtime, the accuracy record, the fixed-width and 2:4 recipes, and
`rsedge-bench model.rspack`."""
import argparse
import hashlib
import json
import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the pack's ONNX is checked with ONNX Runtime")

from runtime_fakes import FAST  # noqa: E402

# the MSE clipping search over 2 fractions instead of 80: the recipe's code path in a fraction of its time
QUICK = {"clip_grid": 2, "log": lambda m: None}


def _images(meta, n=6):
    from rsedge.export.run import preprocess_items
    from rsedge.trainer.stage import model_items

    root, items = model_items(meta, None, "test")
    return preprocess_items(root, items[:n], meta)[0]


@pytest.fixture(scope="module")
def default_pack(trained, synth_data, tmp_path_factory):
    """The default recipe (adaptive P->Q, CR 8) with calibration and accuracy on the fixture's data;
    the fake-quantized model it exported is kept for an independent comparison."""
    from rsedge.export import pack_run as stage

    seen = {}
    real = stage.fake_quantize_model

    def spy(model, qtensors):
        seen["fake"] = real(model, qtensors)
        return seen["fake"]

    mp = pytest.MonkeyPatch()
    mp.setattr(stage, "fake_quantize_model", spy)
    try:
        out = tmp_path_factory.mktemp("pack")
        record = stage.pack_run(trained, out, data=synth_data, calib_images=16, **QUICK)
    finally:
        mp.undo()
    return out, record, seen["fake"]


def test_default_recipe_reaches_cr_8_measured_on_the_files(default_pack, trained):
    out, record, _ = default_pack
    pack = out / "model.rspack"
    measured = os.path.getsize(trained) / os.path.getsize(pack)
    assert measured >= 8
    assert record["pack"]["pack_bytes"] == os.path.getsize(pack) and record["pack"]["cr"] == pytest.approx(measured)
    assert record["pack"]["cr_basis"] == "safetensors" and record["parameters"]["target_cr"] == 8
    c = record["compression"]
    assert c["order"] == "P->Q" and c["prune"]["method"] == "lap"
    assert abs(c["prune"]["total_sparsity"] - 0.5) < 1e-3
    assert c["laq"]["used_bits"] <= c["laq"]["budget_bits"]
    assert len({layer["sparsity"] for layer in c["prune"]["layers"]}) > 1  # layer-adaptive, not one level
    assert record["calibration"]["importance"] == "loss" and record["calibration"]["images"] == 16
    assert record["round_trip"]["max_abs_diff"] < 1e-4
    assert json.loads((out / "record.json").read_text())["stage"] == "pack"


def test_unpacked_onnx_matches_the_fake_quantized_model(default_pack, trained, tmp_path):
    import onnxruntime as ort
    import torch

    from rsedge.runtime.pack import unpack_to_onnx
    from rsedge.trainer.modelfile import load_model

    out, _, fake = default_pack
    model, meta = load_model(trained)
    x = _images(meta)
    onnx_path = unpack_to_onnx(str(out / "model.rspack"), str(tmp_path / "device"))
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(len(x))])
    with torch.no_grad():
        want = fake.eval()(torch.from_numpy(x)).numpy()
        fp32 = model.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(fp32 - want).max() > 1e-3  # the pack holds the compressed model, not the FP32 one


def test_with_data_the_record_has_both_metrics(default_pack, trained):
    from rsedge.trainer.modelfile import read_metadata
    from rsedge.trainer.records import read_json

    _, record, _ = default_pack
    acc = record["accuracy"]
    split = read_json(read_metadata(trained)["split"])
    assert acc["metric"] == "top1" and acc["images"] == len(split["test"]) and acc["split"] == "test"
    assert 0 <= acc["fp32"] <= 1 and 0 <= acc["pack"] <= 1
    assert acc["drop_points"] == pytest.approx(100 * (acc["fp32"] - acc["pack"]))


def test_rsedge_bench_runs_the_pack_and_refuses_a_damaged_one(default_pack, synth_data, tmp_path, capsys):
    from rsedge.runtime import cli

    out, record, _ = default_pack
    rc = cli.main([str(out / "model.rspack"), "--threads", "1", "--eval", str(synth_data), "--eval-limit", "12",
                   "--json", str(tmp_path / "r.json")] + FAST)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "unpacked to" in captured.err
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    assert run["pack"]["cr"] == pytest.approx(record["pack"]["cr"]) and run["accuracy"]["n"] == 12
    data = bytearray((out / "model.rspack").read_bytes())
    data[-100] ^= 0x10
    bad = tmp_path / "bad.rspack"
    bad.write_bytes(bytes(data))
    assert cli.main([str(bad)] + FAST) == 2
    assert "bad.rspack: payload sha256 mismatch" in capsys.readouterr().err


def test_fixed_4_bits(trained, tmp_path):
    from rsedge.export.pack_run import pack_run
    from rsedge.runtime.pack import describe, read_pack

    record = pack_run(trained, tmp_path / "p", bits=4, method="fixed", **QUICK)
    c = record["compression"]
    assert set(c["bits"].values()) == {4} and c["laq"] is None and c["prune"]["method"] == "fixed"
    assert abs(c["prune"]["total_sparsity"] - 0.5) < 1e-6
    assert record["parameters"]["target_cr"] is None and record["accuracy"] is None and record["calibration"] is None
    info = describe(read_pack(str(tmp_path / "p" / "model.rspack")))
    assert info["bits"] == [4] and info["cr"] == pytest.approx(record["pack"]["cr"])
    assert record["round_trip"]["max_abs_diff"] < 1e-4


def test_2_4_pattern_survives_into_the_unpacked_onnx(trained, tmp_path):
    import onnx
    import torch
    from onnx import numpy_helper

    from rsedge.compress.unstructured import is_2_4_sparse
    from rsedge.export.pack_run import pack_run
    from rsedge.runtime.pack import unpack_to_onnx

    record = pack_run(trained, tmp_path / "p", pattern="2:4", bits=8, order="qp", **QUICK)
    assert record["compression"]["prune"]["method"] == "2:4" and record["compression"]["order"] == "Q->P"
    dense = set(record["compression"]["prune"]["dense"])
    assert dense == {"conv1.weight"}  # 3 input channels: not a multiple of 4
    graph = onnx.load(unpack_to_onnx(str(tmp_path / "p" / "model.rspack"), str(tmp_path / "dev")))
    convs = [numpy_helper.to_array(i) for i in graph.graph.initializer if len(i.dims) == 4]
    eligible = [w for w in convs if w.shape[1] % 4 == 0]
    assert len(eligible) == len(convs) - 1 and all(is_2_4_sparse(torch.from_numpy(w.copy())) for w in eligible)


def test_options_are_checked_before_any_work(trained, tmp_path):
    from rsedge.export.pack_run import PackRunOptions, pack_run

    assert PackRunOptions().resolved().target_cr == 8 and PackRunOptions().resolved().method == "lap"
    assert PackRunOptions(pattern="2:4").resolved().method == "fixed"
    for fields, message in (({"bits": 4, "target_cr": 8}, "give one of the two"), ({"bits": 9}, "1 to 8"),
                            ({"order": "x"}, "pq or qp"), ({"target_cr": 1}, "above 1"),
                            ({"pattern": "2:4", "method": "lap"}, "method 'fixed'"), ({"sparsity": 1.0}, "sparsity")):
        with pytest.raises(ValueError, match=message):
            pack_run(trained, tmp_path / "never", **fields)
    assert not (tmp_path / "never").exists()


def test_the_cli_parses_into_the_stage_options(monkeypatch, capsys):
    from rsedge.cli import pack_cmd
    from rsedge.cli.options import Formatter
    from rsedge.export import pack_run as stage

    parser = argparse.ArgumentParser(prog="rsedge")
    pack_cmd.add_pack_parser(parser.add_subparsers(dest="command"), Formatter)
    args = parser.parse_args(["pack", "--model", "m.safetensors", "--out", "o", "--bits", "3", "--method", "fixed",
                              "--order", "qp", "--per-tensor", "--data", "d", "--eval-images", "50"])
    seen = {}
    monkeypatch.setattr(stage, "pack_run", lambda model, out, options: seen.update(model=model, out=out, o=options))
    assert args.func(args) == 0
    o = seen["o"]
    assert (seen["model"], seen["out"], o.bits, o.method, o.order, o.per_channel, o.data, o.eval_images) == (
        "m.safetensors", "o", 3, "fixed", "qp", False, "d", 50)
    assert o.target_cr is None and o.clipping == "mse" and o.sparsity == 0.5
    assert "rsedge-bench o/model.rspack" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["pack", "--model", "m", "--out", "o", "--pattern", "1:4"])


def test_a_bundle_carries_the_pack_and_the_device_unpacks_it(default_pack, trained, synth_data, tmp_path, capsys,
                                                             no_tensorrt):
    from rsedge.export.bundle import bundle_run
    from rsedge.runtime import cli
    from rsedge.runtime.bundles.manifest import verify_manifest

    out, record, _ = default_pack
    bundle = tmp_path / "b"
    manifest = bundle_run(trained, bundle, pack=out / "model.rspack", data=synth_data, calib_size=0, eval_size=12,
                          log=lambda m: None)["manifest"]
    files = manifest["files"]
    assert "model.rspack" in files and not [f for f in files if f.endswith(".onnx")] and "calib" not in str(files)
    assert manifest["variants"] == [{"name": "pack", "pack": "model.rspack", "onnx": "unpacked/pack/model.onnx",
                                     "precision": "fp32"}]
    sent = manifest["transfer"]
    assert sent["model_bytes"] == files["model.rspack"]["bytes"] == record["pack"]["pack_bytes"]
    assert sent["bytes"] == sum(f["bytes"] for f in files.values())
    assert manifest["pack"]["cr"] == pytest.approx(record["pack"]["cr"])
    assert manifest["pack"]["accuracy"] == record["accuracy"]
    for attempt in range(2):
        rc = cli.main([str(bundle), "--threads", "1", "--json", str(tmp_path / "r.json")] + FAST)
        err = capsys.readouterr().err
        assert rc == 0, err
        assert ("unpacked from model.rspack before" in err) == (attempt == 1)
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    assert run["label"] == "b:pack (onnx)" and run["accuracy"]["n"] == 12
    assert (bundle / "unpacked" / "pack" / "weights.bin").is_file()
    assert verify_manifest(str(bundle))["verification"]["unlisted"] == []  # unpacked/ is the device's


def test_a_bundle_refuses_a_pack_of_another_model(default_pack, trained):
    from rsedge.export.bundle import _pack_of
    from rsedge.trainer.modelfile import read_metadata

    out, _, _ = default_pack
    meta = read_metadata(trained)
    assert _pack_of(out / "model.rspack", trained, meta).model["arch"] == "resnet18"
    with pytest.raises(ValueError, match="is a pack of a resnet18"):
        _pack_of(out / "model.rspack", "other.safetensors", dict(meta, arch="mobilenet_v3_small"))
    with pytest.raises(ValueError, match="not of other.safetensors"):
        _pack_of(out / "model.rspack", "other.safetensors", dict(meta, classes=list(meta["classes"])[::-1]))


def test_the_device_unpacks_a_bundles_pack_once_and_drops_engines_of_another(tmp_path):
    from rsedge.runtime import pack as rpack
    from rsedge.runtime.bundles.bundle import Bundle
    from rsedge.runtime.bundles.manifest import write_manifest
    from rsedge.runtime.errors import ManifestError

    b = tmp_path / "b"
    b.mkdir()

    def send(value, onnx="unpacked/pack/model.onnx"):
        rpack.write_pack_file(str(b / "model.rspack"), b"graph", [("w", 0, np.full(4, value, np.float32))],
                              {"name": "t"})
        write_manifest(str(b), {"variants": [{"name": "pack", "pack": "model.rspack", "onnx": onnx,
                                              "precision": "fp32"}]})

    def weights():
        return np.frombuffer((b / "unpacked" / "pack" / "weights.bin").read_bytes(), "<f4").tolist()

    logs = []
    send(1.0)
    Bundle.open(str(b), log=logs.append)
    assert (b / "unpacked" / "pack" / "model.onnx").read_bytes() == b"graph" and weights() == [1.0] * 4
    (b / "engines").mkdir()
    for name in ("pack-fp32-b1.engine", "pack-fp32-b1.json", "other-fp32-b1.engine"):
        (b / "engines" / name).write_bytes(b"x")
    Bundle.open(str(b), log=logs.append)
    assert logs[-1] == "unpacked/pack/model.onnx: unpacked from model.rspack before"
    assert (b / "engines" / "pack-fp32-b1.engine").exists()
    send(2.0)  # another pack of the same graph: the engines built from the first are stale
    bundle = Bundle.open(str(b), log=logs.append)
    assert weights() == [2.0] * 4 and sorted(os.listdir(b / "engines")) == ["other-fp32-b1.engine"]
    assert bundle.sha256("unpacked/pack/model.onnx") == hashlib.sha256(b"graph").hexdigest()  # what builds record
    send(2.0, onnx="../model.onnx")
    with pytest.raises(ManifestError, match="must unpack to unpacked/<folder>/<file>.onnx"):
        Bundle.open(str(b))
