"""The runtime must import on a device without torch or onnx, and never pull them in."""

import os
import subprocess
import sys

import pytest

RUNTIME = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runtime")
MODULES = sorted(name[:-3] for name in os.listdir(RUNTIME) if name.endswith(".py") and name != "__main__.py")


def test_every_module_imports_without_torch_or_onnx():
    code = ("import sys\n"
            f"for name in {MODULES!r}:\n"
            "    __import__('rsedge.runtime.' + name if name != '__init__' else 'rsedge.runtime')\n"
            "heavy = ('torch', 'onnx', 'torchvision', 'tensorrt', 'onnxruntime')\n"
            "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == ""  # nothing heavy, not even the optional backends, at import time


def test_python_dash_m_entry_points():
    for module in ("rsedge.runtime", "rsedge.runtime.trt_build"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, check=False)
        assert out.returncode == 0, out.stderr.decode()
        assert b"usage:" in out.stdout


@pytest.mark.skipif(not os.path.isfile(os.path.expanduser("~/.pyenv/versions/3.6.15/bin/python")),
                    reason="no Python 3.6 interpreter here to compile the runtime with")
def test_runtime_compiles_with_python36():
    py36 = os.path.expanduser("~/.pyenv/versions/3.6.15/bin/python")
    files = [os.path.join(RUNTIME, n) for n in sorted(os.listdir(RUNTIME)) if n.endswith(".py")]
    out = subprocess.run([py36, "-m", "py_compile", *files], capture_output=True, check=False)
    assert out.returncode == 0, out.stderr.decode()
