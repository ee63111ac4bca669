import json
import subprocess
import sys

from rsedge.cli.main import main


def test_help_lists_every_command(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for cmd in ("data", "train", "eval", "prune", "finetune", "export", "bench", "build", "demo"):
        assert cmd in out


def test_missing_model_file_is_a_one_line_error(tmp_path, capsys):
    code = main(["prune", "--model", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "model file not found" in err and "Traceback" not in err


def test_full_cli_path(tmp_path, synth_data, trained, capsys):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(trained), "--method", "bn-scale", "--ratio", "0.5",
                 "--out", str(pruned), "--data", str(synth_data)]) == 0
    rec = json.loads((pruned / "record.json").read_text())
    assert rec["stage"] == "prune" and rec["after"]["params"] < 0.6 * rec["before"]["params"]
    assert rec["after"]["macs"] < rec["before"]["macs"] and rec["val_top1_before_finetune"] is not None
    assert {"torch", "torch_pruning", "python"} <= set(rec["versions"])

    ft = tmp_path / "ft"
    assert main(["finetune", "--model", str(pruned / "model.safetensors"), "--data", str(synth_data),
                 "--epochs", "1", "--workers", "0", "--out", str(ft), "--quiet", "--loss", "aml"]) == 0
    assert (ft / "model.safetensors").is_file() and (ft / "confusion.png").is_file()
    assert json.loads((ft / "split.json").read_text())["test"] == json.loads(
        (trained.parent / "split.json").read_text())["test"]

    ev = tmp_path / "ev"
    assert main(["eval", "--model", str(ft / "model.safetensors"), "--data", str(synth_data), "--out", str(ev),
                 "--quiet"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["split"] == "test" and set(metrics["per_class"]) == set(json.loads(
        (trained.parent / "split.json").read_text())["classes"])
    assert "top-1 accuracy" in capsys.readouterr().out

    ex = tmp_path / "ex"
    assert main(["export", "--model", str(ft / "model.safetensors"), "--out", str(ex)]) == 0
    assert (ex / "model.onnx").is_file()


def test_bench_is_the_runtime_benchmark(tmp_path, trained):
    from rsedge.export.run import export_run

    export_run(trained, tmp_path, simplifier="none", log=lambda m: None)
    out = tmp_path / "bench.json"
    code = main(["bench", str(tmp_path / "model.onnx"), "--duration", "0.2", "--iterations", "5",
                 "--warmup", "0.05", "--json", str(out), "--quiet"])
    assert code == 0
    doc = json.loads(out.read_text())
    text = json.dumps(doc)
    assert "median" in text and "throughput_ips" in text


def test_console_scripts_installed():
    r = subprocess.run([sys.executable, "-m", "rsedge.cli.main", "models"], capture_output=True, text=True, check=True)
    assert "resnet18" in r.stdout.split()
