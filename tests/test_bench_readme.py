"""The README's set-up and `rsedge bench` text holds: paths, the CPU-only install, the documented commands."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from rsedge.runtime import cli

ROOT = Path(__file__).resolve().parent.parent


def code_lines(path):
    """Lines inside ``` blocks."""
    inside, out = False, []
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            out.append(line.strip())
    return out


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_setup_torch_index_cpu_installs_cpu_wheels_first(tmp_path):
    def dry_run(*extra):
        return subprocess.run(["make", "-n", "-B", "-C", str(ROOT), "setup", f"VENV={tmp_path / 'v'}"] + list(extra),
                              capture_output=True, text=True, check=True).stdout.splitlines()

    lines = dry_run("TORCH_INDEX=cpu")
    cpu = [i for i, line in enumerate(lines) if "--index-url https://download.pytorch.org/whl/cpu" in line]
    host = [i for i, line in enumerate(lines) if "-e '.[host,dev]'" in line]
    assert len(cpu) == 1 and len(host) == 1 and cpu[0] < host[0] and "torch torchvision" in lines[cpu[0]]
    assert not any("download.pytorch.org" in line for line in dry_run())
    readme = (ROOT / "README.md").read_text()
    assert "make setup TORCH_INDEX=cpu" in readme
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in readme


def test_shared_data_paths_are_relative_to_the_project_root():
    shared = ROOT.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip(f"no shared data folder next to this checkout ({shared})")
    paths = set(re.findall(r"\.\./shared/data/[A-Za-z0-9_]+", (ROOT / "README.md").read_text()))
    assert paths, "the README names no ../shared/data path any more"
    assert [p for p in sorted(paths) if not (ROOT / p).is_dir()] == []


@pytest.mark.parametrize("doc", ["README.md", "runtime/README.md"])
def test_documented_bench_commands_parse(doc, capsys):
    commands = []
    for line in code_lines(ROOT / doc):
        text = re.split(r"\s{2,}#|\s{3,}", line)[0]  # drop "   # comment" and the aligned descriptions
        if text.startswith("rsedge-bench "):
            commands.append(shlex.split(text)[1:])
        elif text.startswith("rsedge bench "):
            commands.append(shlex.split(text)[2:])
    assert len(commands) >= 3
    parser = cli.build_parser()
    for argv in commands:
        args = cli.parse_args(parser, argv)
        assert args.models, argv
