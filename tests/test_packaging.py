"""The distribution maps every package folder, and the device path stays light."""
from __future__ import annotations

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


def imported_modules(path: Path, text: str | None = None) -> set[str]:
    """Every module a file imports, however it is written: `import rsedge.x`, `from rsedge.x import y`,
    `from rsedge import x` (-> rsedge.x) and relative imports resolved against the file's package."""
    import ast

    rel = path.relative_to(ROOT).with_suffix("")
    package = ["rsedge", *rel.parts[:-1]]
    found: set[str] = set()
    source = path.read_text() if text is None else text
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def test_layers_point_one_way():
    """trainer <- compress <- export <- cli; runtime, the bottom layer, imports none of them."""
    forbidden = {
        "trainer": ("rsedge.compress", "rsedge.export", "rsedge.cli"),
        "compress": ("rsedge.export", "rsedge.cli"),
        "export": ("rsedge.cli",),
        "runtime": ("rsedge.trainer", "rsedge.compress", "rsedge.export", "rsedge.cli"),
    }
    for folder, bad in forbidden.items():
        for f in (ROOT / folder).rglob("*.py"):
            for mod in imported_modules(f):
                assert not any(mod == b or mod.startswith(b + ".") for b in bad), f"{f} imports {mod}"


def test_import_check_catches_every_spelling():
    text = "from rsedge import compress\nimport rsedge.export.run as r\nfrom ..cli import main\n"
    found = imported_modules(ROOT / "trainer" / "probe.py", text)
    assert {"rsedge.compress", "rsedge.export.run", "rsedge.cli.main"} <= found


def test_rsedge_bench_entry_does_not_import_torch():
    code = "import sys, rsedge.runtime.cli; assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
