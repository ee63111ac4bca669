"""`rsedge bench MODEL.safetensors`: the host model as a PyTorch row of the comparison, as `yolo benchmark` has."""

import json

from rsedge.cli.main import main

FAST = ["--warmup", "0", "--iterations", "3", "--duration", "0", "--no-power", "--threads", "1"]


def test_host_model_file_gets_a_pytorch_row_evaluated_on_a_folder(trained, synth_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", str(trained), "--batch", "1,4", "--eval", str(synth_data), "--json", str(out)] + FAST)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(out.read_text())
    (run,) = doc["runs"]
    assert run["label"] == "model.safetensors (pytorch)" and run["backend"] == "pytorch"
    assert run["precision"] == "fp32" and run["provider"] == "cpu" and run["model"] == str(trained)
    assert [r["batch"] for r in run["results"]] == [1, 4]
    n_images = sum(1 for p in synth_data.rglob("*.png"))
    # Preprocessed from the model's own metadata, so a trained model scores far above chance (1/6).
    assert run["accuracy"]["n"] == n_images and run["accuracy"]["top1"] > 0.5
    assert "model.safetensors (pytorch)" in captured.out and "pytorch" in captured.out


def test_a_file_that_is_no_model_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["bench", str(bad)] + FAST) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and "Traceback" not in err


def test_backend_options_do_not_apply_to_a_model_file(trained, capsys):
    assert main(["bench", str(trained), "--backend", "onnxruntime"] + FAST) == 2
    assert "runs with PyTorch" in capsys.readouterr().err
