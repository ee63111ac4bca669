"""The runtime must import on a device without torch or onnx, never pull them in, and have no import cycle."""

import ast
import os
import subprocess
import sys

import pytest

RUNTIME = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runtime")


def _module_name(path, root=RUNTIME):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(["rsedge.runtime"] + rel)


def runtime_files(top=RUNTIME):
    files = []
    for root, dirs, names in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(".py"))
    return files


MODULES = sorted(_module_name(f) for f in runtime_files() if not f.endswith("__main__.py"))


def test_every_module_imports_without_torch_or_onnx():
    assert "rsedge.runtime.backends.trt" in MODULES and "rsedge.runtime.tasks.classification" in MODULES
    code = ("import sys\n"
            f"for name in {MODULES!r}:\n"
            "    __import__(name)\n"
            "heavy = ('torch', 'onnx', 'torchvision', 'tensorrt', 'onnxruntime', 'PIL')\n"
            "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == ""  # nothing heavy, not even the optional backends, at import time


def test_python_dash_m_entry_points():
    for module in ("rsedge.runtime", "rsedge.runtime.build"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, check=False)
        assert out.returncode == 0, out.stderr.decode()
        assert b"usage:" in out.stdout
    assert b"python3 -m rsedge.runtime.build" in subprocess.run(
        [sys.executable, "-m", "rsedge.runtime.build", "--help"], capture_output=True, check=False).stdout


def import_graph(top=RUNTIME):
    """{module: set of runtime modules it imports}, from the source (every import, lazy ones included).

    `from . import x` points at the submodule x when there is one, else at the package; an edge
    is what the file names, not the parent packages Python also initializes on the way.
    """
    known = {_module_name(f, top): f for f in runtime_files(top)}
    graph = {}
    for name, path in known.items():
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base + "." + a.name if base + "." + a.name in known else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in known and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_runtime_import_graph_is_acyclic():
    graph = import_graph()
    assert "rsedge.runtime.build.trt_build" in graph["rsedge.runtime.cli"]  # lazy imports are edges too
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_sees_a_lazy_cycle(tmp_path):
    """The check itself: the cycle the runtime had (trt_build imported the CLI's help formatter, lazily)."""
    pkg = tmp_path / "runtime"
    (pkg / "build").mkdir(parents=True)
    for rel, text in {"__init__.py": "", "cli.py": "def f():\n    from .build.trt_build import g\n",
                      "build/__init__.py": "", "build/trt_build.py": "def g():\n    from ..cli import f\n"}.items():
        (pkg / rel).write_text(text)
    cycle = find_cycle(import_graph(str(pkg)))
    assert cycle is not None and "rsedge.runtime.cli" in cycle and "rsedge.runtime.build.trt_build" in cycle


@pytest.mark.skipif(not os.path.isfile(os.path.expanduser("~/.pyenv/versions/3.6.15/bin/python")),
                    reason="no Python 3.6 interpreter here to compile the runtime with")
def test_runtime_compiles_with_python36():
    py36 = os.path.expanduser("~/.pyenv/versions/3.6.15/bin/python")
    files = runtime_files()
    assert any(os.sep + "tasks" + os.sep in f for f in files)
    out = subprocess.run([py36, "-m", "py_compile", *files], capture_output=True, check=False)
    assert out.returncode == 0, out.stderr.decode()
