"""The compression stages end to end on the synthetic data: every criterion through `prune`, the
L1RR path through sparse-train -> prune -> finetune (AML + distillation) -> export -> bench, the
iterative schedule, distillation and the seed schedule, and clear errors."""
import json
import math

import pytest
import torch
from torch import nn

from rsedge.cli.main import main

QUIET = dict(progress=False, log=lambda m: None)


def test_cli_method_list_is_the_library_list():
    from rsedge.cli.compress_cmds import PRUNE_METHODS
    from rsedge.compress.prune import METHODS

    assert PRUNE_METHODS == METHODS


@pytest.mark.parametrize("method", ["random", "l1", "bn-scale", "fpgm", "taylor", "cap", "group", "l1rr"])
def test_every_method_prunes_the_trained_model(tmp_path, synth_data, trained, method):
    from rsedge.compress.prune import prune_run
    from rsedge.trainer.modelfile import load_model

    report = prune_run(trained, tmp_path, method=method, ratio=0.5, data=synth_data, workers=0, taylor_batches=2,
                       cap_samples=32, batch_size=32, **QUIET)
    assert report["after"]["params"] < 0.7 * report["before"]["params"]
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["parameters"]["method"] == method and rec["val_top1_before_finetune"] is not None
    row = next(r for r in rec["layers"] if r["layer"] == "layer1.0.conv1")
    assert {"channels_before", "channels_after", "requested_ratio", "achieved_ratio"} <= set(row)
    assert row["channels_after"] % 8 == 0
    model, meta = load_model(tmp_path / "model.safetensors")
    assert meta["history"][-1]["stage"] == "prune" and meta["history"][-1]["method"] == method
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 6)
    assert not any(isinstance(m, nn.Module) and type(m).__name__ == "SEProbe" for m in model.modules())


def test_l1rr_path_through_finetune_export_and_bench(tmp_path, synth_data, trained):
    sparse, pruned, ft, ex = (tmp_path / d for d in ("sparse", "pruned", "ft", "ex"))
    assert main(["sparse-train", "--model", str(trained), "--data", str(synth_data), "--out", str(sparse),
                 "--epochs", "2", "--phase-epochs", "1", "--theta", "0.05", "--workers", "0", "--quiet"]) == 0
    assert main(["prune", "--model", str(sparse / "model.safetensors"), "--method", "l1rr", "--target-lfa", "0.05",
                 "--coupling", "reconstruct", "--compensate", "--lfa-images", "16", "--data", str(synth_data),
                 "--out", str(pruned), "--workers", "0", "--quiet"]) == 0
    rec = json.loads((pruned / "record.json").read_text())
    fa = rec["feature_attention"]
    assert rec["coupling"] == "reconstruct" and abs(fa["chosen"]["lfa"]) <= 0.05 * 1.25 == fa["accepted_abs_lfa"]
    assert fa["tolerance"] == 0.25 and rec["parameters"]["lfa_tolerance"] == 0.25
    assert rec["compensation"] is not None and rec["parameters"]["target_lfa"] == 0.05
    assert main(["finetune", "--model", str(pruned / "model.safetensors"), "--data", str(synth_data),
                 "--epochs", "1", "--workers", "0", "--out", str(ft), "--quiet", "--loss", "aml",
                 "--kd-from", str(trained), "--preset", "remotetrimmer"]) == 0
    frec = json.loads((ft / "record.json").read_text())
    assert frec["parameters"]["distillation"]["temperature"] == 4.0
    assert frec["parameters"]["lr"] == 1e-3 and frec["parameters"]["schedule"] == "step"
    assert main(["export", "--model", str(ft / "model.safetensors"), "--out", str(ex)]) == 0
    xrec = json.loads((ex / "record.json").read_text())
    assert xrec["onnx"]["parity"]["top1_agreement"] == 1.0
    out = tmp_path / "bench.json"
    assert main(["bench", str(ex / "model.onnx"), "--duration", "0.2", "--iterations", "5", "--warmup", "0.05",
                 "--json", str(out), "--quiet"]) == 0
    assert "median" in out.read_text()


def test_iterative_taylor_schedule(tmp_path, synth_data, trained):
    from rsedge.compress.prune import prune_run

    report = prune_run(trained, tmp_path, method="taylor", ratio=0.5, data=synth_data, steps=2, step_epochs=1,
                       taylor_batches=2, batch_size=32, workers=0, **QUIET)
    rec = json.loads((tmp_path / "record.json").read_text())
    assert [s["step"] for s in rec["steps"]] == [1, 2] and [s["ratio"] for s in rec["steps"]] == [0.25, 0.5]
    assert "finetune" in rec["steps"][0] and "finetune" not in rec["steps"][1]
    widths = {r["layer"]: r["channels_after"] for r in report["layers"]}
    assert widths["layer1.0.conv1"] == 32 and widths["layer4.0.conv1"] == 256  # half of the original
    assert rec["steps"][0]["params"] > rec["steps"][1]["params"]


def test_distillation_loss_on_a_hand_case():
    from rsedge.compress.losses import distillation_loss

    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0, 0.0]])
    temp = 2.0
    ps, pt = (s / temp).softmax(1)[0], (t / temp).softmax(1)[0]
    expected = sum(float(pt[i] * (math.log(pt[i]) - math.log(ps[i]))) for i in range(3)) * temp ** 2
    assert distillation_loss(s, t, temp).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-7)


def test_remotetrimmer_preset_is_the_seed_schedule():
    from rsedge.compress.finetune import apply_preset
    from rsedge.trainer.train import TrainConfig, lr_at

    cfg = apply_preset(TrainConfig(epochs=8, optimizer="adamw", lr=0.1), "remotetrimmer").resolved()
    assert (cfg.optimizer, cfg.lr, cfg.schedule, cfg.step_gamma) == ("sgd", 1e-3, "step", 0.9)
    assert [round(lr_at(cfg, e), 6) for e in (0, 4, 6)] == [1e-3, 9e-4, 8.1e-4]


@pytest.mark.parametrize("args,message", [
    (["--method", "taylor"], "needs --data"),
    (["--method", "cap", "--ratio", "0.3"], "needs --data"),
    (["--method", "l1", "--threshold", "0.1"], "threshold method"),
    (["--method", "l1rr", "--target-lfa", "0.01"], "needs --data"),
    (["--method", "l1", "--coupling", "reconstruct", "--steps", "2", "--data", "x"], "--coupling shared"),
])
def test_bad_options_are_one_line_errors(tmp_path, trained, capsys, args, message):
    code = main(["prune", "--model", str(trained), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
