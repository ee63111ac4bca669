"""Shared fixtures: small data the tests make themselves, and a model trained on it once."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    from rsedge.trainer.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, per_class=30, size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synth_data) -> Path:
    """A resnet18 trained briefly at 32x32: enough to have real, non-random weights and BN stats."""
    from rsedge.trainer.run import train_run
    from rsedge.trainer.train import TrainConfig

    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="adamw", lr=2e-3, workers=0, seed=0)
    train_run(synth_data, "resnet18", out, img_size=32, cfg=cfg, progress=False, log=lambda m: None)
    return out / "model.safetensors"


@pytest.fixture(scope="session")
def runtime_helpers():
    """tests/runtime_fakes.py: fake TensorRT/CUDA, small ONNX models and bundles (also `import runtime_fakes`)."""
    import runtime_fakes

    return runtime_fakes


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Behave as on a machine without TensorRT, even if one is installed."""
    from rsedge.runtime.backends import trt as backends_trt
    from rsedge.runtime.errors import BackendUnavailable

    def unavailable():
        raise BackendUnavailable("TensorRT's Python package is not importable here (test)")

    monkeypatch.setattr(backends_trt, "import_tensorrt", unavailable)
