"""benchmarks/bench_int8_cpu.py: every option explained, results in the work folder unless --commit-results."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_int8_cpu", str(BENCH / "bench_int8_cpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_option_has_help(bench, capsys):
    parser = bench.build_parser()
    assert [a.option_strings for a in parser._actions if a.option_strings and not (a.help or "").strip()] == []
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--commit-results" in text and "(default: None)" not in text and "(default: False)" not in text


def test_results_go_to_the_work_folder_unless_commit_results(bench):
    args = bench.build_parser().parse_args([])
    assert bench.results_dir(args.out, args.commit_results) == BENCH / "work" / "results"
    assert Path(args.work) == BENCH / "work" / "int8_cpu" and args.img_size == 224
    args = bench.build_parser().parse_args(["--commit-results"])
    assert bench.results_dir(args.out, args.commit_results) == BENCH / "results"


def test_machine_names_the_int8_instruction_sets(bench):
    m = bench.machine()
    assert set(m["isa"]) >= {"avx2", "avx512_vnni", "avx_vnni", "amx_int8"} and isinstance(m["vnni"], bool)
    assert m["vnni"] == (m["isa"]["avx512_vnni"] or m["isa"]["avx_vnni"])
