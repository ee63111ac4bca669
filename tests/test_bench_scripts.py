"""The benchmark scripts: every option explained, results to a git-ignored work folder unless --commit-results."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = ["bench_export.py", "bench_harness_overhead.py", "bench_pruning.py", "reproduce_remotetrimmer.py"]
FLAG = {"bench_export.py": "out", "bench_harness_overhead.py": "out", "bench_pruning.py": "results",
        "reproduce_remotetrimmer.py": "results"}


def load(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_" + name[:-3], str(BENCH / name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_option_has_help_and_no_default_none(name, monkeypatch, capsys):
    parser = load(name, monkeypatch).build_parser()
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert undocumented == []
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--commit-results" in text and "(default: None)" not in text and "(default: False)" not in text
    formatter = parser._get_formatter()
    zero = [a for a in parser._actions if a.default == 0 and a.default is not False and a.option_strings]
    assert all(formatter._get_help_string(a).endswith("(default: 0)") for a in zero)  # 0 is a default, not "none"


@pytest.mark.parametrize("name", SCRIPTS)
def test_results_go_to_the_work_folder_unless_commit_results(name, monkeypatch):
    module = load(name, monkeypatch)
    flag = FLAG[name]
    args = module.build_parser().parse_args([])
    assert module.results_dir(getattr(args, flag), args.commit_results) == BENCH / "work" / "results"
    args = module.build_parser().parse_args(["--commit-results"])
    assert module.results_dir(getattr(args, flag), args.commit_results) == BENCH / "results"
    args = module.build_parser().parse_args(["--" + flag, "/tmp/x"])
    assert module.results_dir(getattr(args, flag), args.commit_results) == Path("/tmp/x")


def test_work_folder_is_git_ignored():
    rules = (BENCH.parent / ".gitignore").read_text().split()
    assert "/benchmarks/work/" in rules


def test_bench_device_help_is_the_comment_block_only():
    out = subprocess.run(["bash", str(BENCH / "bench_device.sh"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "set -euo" not in out and not any(line.startswith("#") for line in out.splitlines())
    for option in ("--nvpmodel", "--jetson-clocks", "--batch", "--out", "--commit-results", "--help"):
        assert option in out


def _fake_bench(tmp_path):
    """An rsedge-bench on PATH that records its arguments, so the script's choices can be checked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "args.json"
    fake = bin_dir / "rsedge-bench"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(log)!r}, 'w'))\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=str(bin_dir) + os.pathsep + os.environ.get("PATH", ""))
    return env, log


@pytest.mark.parametrize("extra, expected", [([], "work/results"), (["--commit-results"], "results")])
def test_bench_device_writes_to_work_unless_commit_results(tmp_path, extra, expected, monkeypatch):
    env, log = _fake_bench(tmp_path)
    bundle = tmp_path / "bundle.tar.gz"
    bundle.write_bytes(b"")  # an archive is accepted as it is; rsedge-bench opens it
    subprocess.run(["bash", str(BENCH / "bench_device.sh"), str(bundle)] + extra, env=env, check=True,
                   capture_output=True)
    args = json.loads(log.read_text())
    json_out = Path(args[args.index("--json") + 1])
    assert args[0] == str(bundle) and "--eval" in args
    assert json_out.parent == BENCH / expected and json_out.name.endswith(".json")


def test_bench_device_refuses_out_and_commit_results_together(tmp_path):
    env, _ = _fake_bench(tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text("{}")
    proc = subprocess.run(["bash", str(BENCH / "bench_device.sh"), str(tmp_path / "b"), "--out", str(tmp_path),
                           "--commit-results"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_remotetrimmer_rows_are_seed_means_with_spread_and_final_epoch_numbers(monkeypatch):
    rt = load("reproduce_remotetrimmer.py", monkeypatch)
    base = [{"test_top1": 0.80, "params": 11_000_000, "macs": 1e8}, {"test_top1": 0.84, "params": 11_000_000,
                                                                     "macs": 1e8}]
    cap = [{"test_top1": 0.78, "test_top1_after_prune": 0.30, "params": 1e6, "macs": 1e7, "ft_epochs": 20,
            "criterion": {"probes": 17, "epochs": 2, "s_bar_mean": 0.5, "s_bar_cv_mean": 0.2,
                          "jaccard_vs_bn_scale": 0.4}},
           {"test_top1": 0.82, "test_top1_after_prune": 0.40, "params": 1e6, "macs": 1e7, "ft_epochs": 20}]
    rows = rt.aggregate({"baseline": base, "cap+aml": cap}, [0.80, 0.84])
    row = rows[1]
    assert row["method"] == "cap+aml" and row["test_top1"] == row["test_top1_mean"] == pytest.approx(0.80)
    assert row["test_top1_std"] == pytest.approx(0.0282843, rel=1e-4) and row["test_top1_per_seed"] == [0.78, 0.82]
    assert row["delta_vs_baseline"] == pytest.approx(-0.02) and row["test_top1_after_prune_mean"] == pytest.approx(0.35)
    for r in rows:
        r["paper"] = rt.PAPER["resnet18"].get(r["method"], {})
    doc = {"rows": rows, "settings": {"model": "resnet18", "ratio": 0.7, "img_size": 64, "seeds": [0, 1],
                                      "baseline_epochs": 12, "ft_epochs": 20, "cap_epochs": 2, "benchmark": None},
           "split": {"seed": 0, "train": 2000, "val": 500, "test": 5400, "train_per_class": 200, "val_per_class": 50},
           "protocol": "fair", "cap_aml_within_half_point_of_baseline": False, "cap_vs_bn_scale_after_prune": None,
           "command": "python x", "date": "d", "seconds": 1.0, "machine": {"cpu": "c", "platform": "p",
                                                                          "gpu_for_training": None},
           "versions": {"torch": "t"}}
    md = rt.markdown(doc, "stem")
    assert "0.8000 ± 0.0283" in md and "| +0.052 |" in md  # ours beside the paper's +5.2 points
    assert "2 SE + 20" in md and "within 0.5 points of the baseline: NO" in md
