import json

import pytest
import torch

from rsedge.compress.prune import prune_model
from rsedge.trainer.modelfile import load_model, read_metadata, save_model
from rsedge.trainer.models import create_model


def _meta(arch, n):
    return {"arch": arch, "classes": [f"c{i}" for i in range(n)], "input_size": [32, 32],
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_pruned_model_round_trip_is_bit_identical(tmp_path, arch):
    torch.manual_seed(0)
    model = create_model(arch, 5)
    for m in model.modules():  # non-trivial BN statistics, so a layout error cannot hide
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.1, 1.0)
    report = prune_model(model, [32, 32], 5, method="l1", ratio=0.5)
    assert report["after"]["params"] < 0.6 * report["before"]["params"]
    path = save_model(tmp_path / "m.safetensors", model, _meta(arch, 5))
    loaded, meta = load_model(path)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["layout"]["layers"], "a pruned model must record its channel layout"
    assert meta["params"] == sum(p.numel() for p in model.parameters())


def test_file_is_plain_safetensors_with_json_metadata(tmp_path):
    from safetensors import safe_open

    path = save_model(tmp_path / "m.safetensors", create_model("resnet18", 3), _meta("resnet18", 3))
    raw = path.read_bytes()
    assert b"pickle" not in raw[:64] and raw[8:9] == b"{"  # safetensors: 8-byte length then a JSON header
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["rsedge"])
    assert meta["arch"] == "resnet18" and meta["layout"] == {"layers": {}, "tensors": {}}


def test_loading_only_builds_registered_architectures(tmp_path):
    from safetensors.torch import save_file

    meta = {**_meta("resnet18", 3), "format": "rsedge-model/1", "arch": "os.system"}
    save_file({"x": torch.zeros(1)}, str(tmp_path / "evil.safetensors"), metadata={"rsedge": json.dumps(meta)})
    with pytest.raises(ValueError, match="evil.safetensors: cannot rebuild its model: unknown model 'os.system'"):
        load_model(tmp_path / "evil.safetensors")


def test_layout_with_an_unknown_layer_type_is_refused(tmp_path):
    path = save_model(tmp_path / "m.safetensors", create_model("resnet18", 3), _meta("resnet18", 3))
    meta = read_metadata(path)
    meta["layout"] = {"layers": {"conv1": {"type": "Lambda", "code": "print(1)"}}, "tensors": {}}
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata={"rsedge": json.dumps(meta)})
    with pytest.raises(ValueError, match="Lambda"):
        load_model(tmp_path / "bad.safetensors")


def test_not_an_rsedge_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an rsedge model"):
        load_model(tmp_path / "plain.safetensors")
