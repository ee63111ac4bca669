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
