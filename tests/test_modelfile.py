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
    report = prune_model(model, [32, 32], method="l1", ratio=0.5)
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


def test_the_file_stores_task_and_constructor_arguments_and_rebuilds_from_them(tmp_path):
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", 3, width_mult=0.5).eval()
    meta = {**_meta("mobilenet_v2", 3), "model_args": {"width_mult": 0.5}}
    path = save_model(tmp_path / "m.safetensors", model, meta)
    meta = read_metadata(path)
    assert meta["task"] == "classification" and meta["model_args"] == {"width_mult": 0.5}
    assert meta["layout"] == {"layers": {}, "tensors": {}}, "the arguments, not a layout, make it narrow"
    loaded, _ = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    plain = read_metadata(save_model(tmp_path / "p.safetensors", create_model("resnet18", 3), _meta("resnet18", 3)))
    assert plain["task"] == "classification" and plain["model_args"] == {}


def _rewrite(path, out, change):
    from safetensors.torch import load_file, save_file

    meta = read_metadata(path)
    change(meta)
    save_file(load_file(str(path)), str(out), metadata={"rsedge": json.dumps(meta)})
    return out


def test_a_file_written_before_task_and_arguments_were_stored_still_loads(tmp_path):
    from rsedge.trainer.models import model_spec
    from rsedge.trainer.tasks import task_for

    torch.manual_seed(0)
    model = create_model("resnet18", 4)
    prune_model(model, [32, 32], method="l1", ratio=0.5)
    path = save_model(tmp_path / "m.safetensors", model, _meta("resnet18", 4))
    old = _rewrite(path, tmp_path / "old.safetensors", lambda m: (m.pop("task"), m.pop("model_args")))
    assert "task" not in read_metadata(old) and "model_args" not in read_metadata(old)
    loaded, meta = load_model(old)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    assert task_for(meta).name == "classification" and model_spec(loaded).head == ("fc",)


def test_a_task_or_arguments_the_architecture_cannot_take_are_refused(tmp_path):
    path = save_model(tmp_path / "m.safetensors", create_model("resnet18", 3), _meta("resnet18", 3))
    other = _rewrite(path, tmp_path / "seg.safetensors", lambda m: m.update(task="segmentation"))
    with pytest.raises(ValueError, match="cannot rebuild its model: the file says task 'segmentation'"):
        load_model(other)
    code = _rewrite(path, tmp_path / "obj.safetensors", lambda m: m.update(model_args={"norm_layer": {"x": 1}}))
    with pytest.raises(ValueError, match="norm_layer must be numbers"):
        load_model(code)


def test_a_reconstructed_model_keeps_its_declared_head(tmp_path):
    from rsedge.compress.prune import prune_network
    from rsedge.trainer.models import head_modules

    torch.manual_seed(0)
    slim, _ = prune_network(create_model("resnet18", 5).eval(), [32, 32], "random", 0.4, coupling="reconstruct")
    loaded, _ = load_model(save_model(tmp_path / "r.safetensors", slim, _meta("resnet18", 5)))
    assert isinstance(loaded, torch.fx.GraphModule)  # a traced graph, not the torchvision class
    assert [m.out_features for m in head_modules(loaded)] == [5]
