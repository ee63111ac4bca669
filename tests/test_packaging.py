"""The distribution maps every package folder, and the device path stays light."""
import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_mapped_and_listed():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    mapping = dict(
        line.split("=") for line in cfg["options"]["package_dir"].strip().splitlines() if line.strip()
    )
    mapping = {k.strip(): v.strip() for k, v in mapping.items()}
    for pkg, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((pkg, *rel)) in listed, init
    assert set(mapping) == {"rsedge.trainer", "rsedge.compress", "rsedge.export", "rsedge.runtime", "rsedge.cli"}


def test_base_install_needs_only_numpy():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["options"]["install_requires"].split() == ["numpy"]
    assert "torch" not in cfg["options.extras_require"]["jetson"]


def test_layers_point_one_way():
    """trainer <- compress <- export <- cli; runtime, the bottom layer, imports none of them."""
    forbidden = {
        "trainer": ("rsedge.compress", "rsedge.export", "rsedge.cli"),
        "compress": ("rsedge.export", "rsedge.cli"),
        "export": ("rsedge.cli",),
        "runtime": ("rsedge.trainer", "rsedge.compress", "rsedge.export", "rsedge.cli"),
    }
    for folder, bad in forbidden.items():
        for f in (ROOT / folder).glob("*.py"):
            text = f.read_text()
            for b in bad:
                assert f"from {b}" not in text and f"import {b}" not in text, f"{f} imports {b}"


def test_rsedge_bench_entry_does_not_import_torch():
    code = "import sys, rsedge.runtime.cli; assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
