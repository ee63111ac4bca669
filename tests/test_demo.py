import json

import pytest

from rsedge.cli.demo import run_demo


def _check_outputs(out, summary):
    assert (out / "report.md").is_file()
    on_disk = json.loads((out / "summary.json").read_text())
    assert [v["name"] for v in on_disk["variants"]] == ["baseline", "pruned", "pruned-int8"]
    for v in on_disk["variants"]:
        assert set(v) >= {"name", "accuracy", "params", "macs", "onnx_mb", "latency_ms_median", "fps"}
        assert 0 <= v["accuracy"] <= 1 and v["latency_ms_median"] > 0 and v["fps"] > 0
    report = (out / "report.md").read_text()
    assert "| baseline |" in report and "| pruned-int8 |" in report
    return on_disk


def test_demo_smoke(tmp_path):
    summary = run_demo(tmp_path / "demo", fast=True, progress=False)
    s = _check_outputs(tmp_path / "demo", summary)
    base, pruned, int8 = s["variants"]
    assert pruned["params"] < 0.6 * base["params"]
    assert int8["onnx_mb"] < 0.35 * pruned["onnx_mb"]


@pytest.mark.slow
def test_full_demo_meets_its_goals(tmp_path):
    summary = run_demo(tmp_path / "demo", fast=False, progress=False)
    s = _check_outputs(tmp_path / "demo", summary)
    c = s["checks"]
    assert c["pruned_params_at_most_60pct"] and c["int8_at_most_35pct_of_fp32"]
    assert c["pruned_accuracy_within_3_points"], c
