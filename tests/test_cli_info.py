"""`rsedge info` in short (and `--json` in full) and `rsedge models` with computed costs."""
import json
import re

from rsedge.cli.main import main


def test_info_summary_of_a_pruned_model(tmp_path, trained, capsys):
    from rsedge.compress.counting import count_macs, count_params
    from rsedge.compress.prune import prune_run
    from rsedge.trainer.modelfile import load_model

    prune_run(trained, tmp_path, method="l1", ratio=0.5, log=lambda m: None)
    path = tmp_path / "model.safetensors"
    model, meta = load_model(path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{count_params(model):,}" in out and f"{count_macs(model, (32, 32)):,}" in out
    assert "resnet18, classification" in out and f"{len(meta['classes'])}: " in out and "3x32x32" in out
    assert re.search(r"layer1\.0\.conv1\s+64 -> 32", out)
    assert "--layout lists them all" in out
    assert re.search(r"1\. train .*\n\s+2\. prune .*method=l1", out)
    assert "metrics       (none)" in out and "MB)" in out
    assert main(["info", str(path), "--layout"]) == 0
    full = capsys.readouterr().out
    assert "--layout lists them all" not in full and len(full.splitlines()) > len(out.splitlines())
    assert main(["info", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["arch"] == "resnet18" and doc["history"][-1]["stage"] == "prune"
    assert doc["layout"]["layers"].endswith("entries")
    assert main(["info", str(path), "--json", "--layout"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["layout"]["layers"], dict)


def test_info_of_an_unpruned_model_says_so(trained, capsys):
    assert main(["info", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "(100.0% of the unpruned resnet18" in out and "none: every layer has the architecture's width" in out
    assert re.search(r"metrics\s+test_top1 0\.\d+", out)


def test_models_lists_computed_params_and_macs(capsys):
    from rsedge.compress.counting import count_macs, count_params
    from rsedge.trainer.models import create_model, list_models

    assert main(["models", "--img-size", "32", "--classes", "6"]) == 0
    out = capsys.readouterr().out
    assert "at 32x32 input, 6 classes" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert set(rows) == set(list_models())
    model = create_model("mobilenet_v2", 6)
    assert rows["mobilenet_v2"] == [f"{count_params(model):,}", f"{count_macs(model, (32, 32)):,}"]
