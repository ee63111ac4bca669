"""Every pruning method on every architecture of the issue, through prune -> finetune -> export ->
`rsedge bench`, on the synthetic data (slow: `make test-all`)."""
import json

import numpy as np
import pytest

from rsedge.cli.main import main
from rsedge.export.onnx_export import run_onnx

ARCHS = ["vgg16_bn", "mobilenet_v2", "efficientnet_b0", "resnet18"]
METHODS = ["random", "l1", "bn-scale", "fpgm", "taylor", "cap", "group", "l1rr"]


@pytest.fixture(scope="module")
def baselines(tmp_path_factory, synth_data):
    from rsedge.trainer.run import train_run
    from rsedge.trainer.train import TrainConfig

    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(f"base_{arch}")
        cfg = TrainConfig(epochs=1, batch_size=32, optimizer="adamw", lr=1e-3, workers=0, seed=0, device="cpu")
        train_run(synth_data, arch, d, img_size=32, cfg=cfg, progress=False, log=lambda m: None)
        out[arch] = d / "model.safetensors"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_method_runs_through_finetune_export_and_bench(tmp_path, synth_data, baselines, arch, method):
    pruned, ft, ex = tmp_path / "p", tmp_path / "ft", tmp_path / "ex"
    coupling = "reconstruct" if method == "l1rr" else "shared"
    assert main(["prune", "--model", str(baselines[arch]), "--method", method, "--ratio", "0.5", "--coupling", coupling,
                 "--data", str(synth_data), "--out", str(pruned), "--workers", "0", "--batch-size", "32",
                 "--taylor-batches", "2", "--cap-samples", "32", "--quiet"]) == 0
    rec = json.loads((pruned / "record.json").read_text())
    assert rec["after"]["params"] < rec["before"]["params"] and rec["after"]["macs"] < rec["before"]["macs"]
    assert main(["finetune", "--model", str(pruned / "model.safetensors"), "--data", str(synth_data), "--epochs", "1",
                 "--batch-size", "32", "--workers", "0", "--out", str(ft), "--quiet", "--loss", "aml"]) == 0
    assert main(["export", "--model", str(ft / "model.safetensors"), "--out", str(ex)]) == 0
    xrec = json.loads((ex / "record.json").read_text())
    # float32 agrees to ~1e-6 of the logits' size: a diverged fine-tune (VGG's logits reach ~3000) is no bug
    scale = max(1.0, float(np.abs(run_onnx(ex / "model.onnx", np.random.default_rng(0).standard_normal(
        (4, 3, 32, 32)).astype(np.float32))).max()))
    assert xrec["onnx"]["parity"]["max_abs_diff"] < 1e-3 * scale
    assert xrec["onnx"]["parity"]["top1_agreement"] == 1.0
    assert xrec["onnx"]["exporter"] == "torchscript" and xrec["onnx"]["opset"] == 13
    out = tmp_path / "bench.json"
    assert main(["bench", str(ex / "model.onnx"), "--duration", "0.1", "--iterations", "3", "--warmup", "0.02",
                 "--json", str(out), "--quiet"]) == 0
