"""The slimmed model computes what the masked model computes (pruned channels silenced at their
BatchNorm), for both coupling modes; residual reconstruction saves, loads and exports."""
import json

import numpy as np
import pytest
import torch
from tiny_models import randomized
from torch import nn

from rsedge.compress.importance import get_criterion
from rsedge.compress.plan import build_units, select
from rsedge.compress.prune import prune_network
from rsedge.compress.slim import apply_plan, masked_copy
from rsedge.trainer.modelfile import IndexedAdd, load_model, read_metadata, save_model
from rsedge.trainer.models import create_model, head_modules


def _randomized(arch, seed=0):
    return randomized(arch, 5, seed)


def _meta(arch):
    return {"arch": arch, "classes": [f"c{i}" for i in range(5)], "input_size": [32, 32],
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}


@pytest.mark.parametrize("coupling", ["shared", "reconstruct"])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_slimmed_equals_masked(arch, coupling):
    model = _randomized(arch)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(x)
    # random scores: every branch of a residual add keeps a different set, the hardest case
    plan = build_units(model, torch.zeros(1, 3, 32, 32), get_criterion("random", seed=3),
                       head_modules(model), coupling)
    select(plan, ratio=0.4, round_to=8, min_channels=8)
    masked = masked_copy(model, plan).eval()
    slim, rewritten = apply_plan(plan)
    slim.eval()
    with torch.no_grad():
        a, b = masked(x), slim(x)
    assert (a - full).abs().max() > 1e-2, "masking must change the function, or the test proves nothing"
    assert (a - b).abs().max() < 1e-4
    n_params = sum(p.numel() for p in slim.parameters())
    assert n_params < 0.8 * sum(p.numel() for p in create_model(arch, 5).parameters())
    adds = [m for m in slim.modules() if isinstance(m, IndexedAdd)]
    if coupling == "reconstruct":
        assert adds and len(adds) == len(rewritten)
        assert any(u.residual for u in plan.units)
        # fresh branches are reordered to the other input: at most one Gather per add
        assert all(m.gathers <= 1 for m in adds), [m.gathers for m in adds]
        # every branch and every union its consumers read stays a multiple of 8
        assert all(m.out_channels % 8 == 0 for m in adds), [m.out_channels for m in adds]
        assert all(u.kept % 8 == 0 for u in plan.units if u.residual)
    else:
        assert not adds


def test_indexed_add_sums_common_channels_and_concatenates_the_rest():
    a = torch.arange(3 * 4, dtype=torch.float32).view(1, 3, 2, 2)  # holds original channels 0, 2, 5
    b = 100 * torch.arange(1, 3 * 4 + 1, dtype=torch.float32).view(1, 3, 2, 2)  # holds 5, 1, 2
    add = IndexedAdd(3, 3, a_common=[1, 2], b_common=[2, 0], a_only=[0], b_only=[1])
    out = add(a, b)
    expected = torch.cat([a[:, 1:2] + b[:, 2:3], a[:, 2:3] + b[:, 0:1], a[:, 0:1], b[:, 1:2]], 1)
    assert torch.equal(out, expected) and add.out_channels == 4 and add.gathers == 2
    aligned = IndexedAdd(3, 3, a_common=[0, 1], b_common=[0, 1], a_only=[2], b_only=[2])
    assert aligned.gathers == 0 and torch.equal(aligned(a, b), torch.cat([a[:, :2] + b[:, :2], a[:, 2:], b[:, 2:]], 1))
    with pytest.raises(ValueError, match="outside"):
        IndexedAdd(3, 3, [0, 1], [3, 0], [2], [1])
    with pytest.raises(ValueError, match="every channel"):
        IndexedAdd(3, 3, [0], [1], [], [0, 2])


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_reconstructed_model_round_trips_and_exports_to_plain_onnx(tmp_path, arch):
    import onnx
    import onnxruntime as ort

    model = _randomized(arch)
    slim, report = prune_network(model, [32, 32], "random", 0.4, coupling="reconstruct", seed=2)
    assert report["reconstructed_adds"]
    path = save_model(tmp_path / "m.safetensors", slim, _meta(arch))
    layout = read_metadata(path)["layout"]
    assert layout["graph"] and all(v["type"] == "IndexedAdd" for v in layout["graph"].values())
    loaded, _ = load_model(path)
    x = torch.randn(3, 3, 32, 32)
    slim.eval()
    with torch.no_grad():
        ref = slim(x)
        assert torch.equal(ref, loaded(x))
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(loaded, (x,), str(onnx_path), dynamo=False, opset_version=13, input_names=["input"],
                      output_names=["logits"])
    ops = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    assert not ops & {"ScatterND", "ScatterElements", "Scatter"}, ops
    assert "Concat" in ops
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x.numpy()})[0]
    assert np.abs(out - ref.numpy()).max() < 1e-4


def test_reconstructed_model_trains(tmp_path):
    model = _randomized("resnet18")
    slim, _ = prune_network(model, [32, 32], "random", 0.4, coupling="reconstruct", seed=2)
    slim.train()
    opt = torch.optim.SGD(slim.parameters(), lr=0.01)
    loss = slim(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in slim.parameters())


def _tampered(tmp_path, change):
    model = _randomized("resnet18")
    slim, _ = prune_network(model, [32, 32], "random", 0.4, coupling="reconstruct", seed=2)
    path = save_model(tmp_path / "m.safetensors", slim, _meta("resnet18"))
    meta = read_metadata(path)
    name = next(iter(meta["layout"]["graph"]))
    change(meta["layout"]["graph"], name)
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata={"rsedge": json.dumps(meta)})
    return bad


def test_layout_graph_modules_come_from_a_whitelist(tmp_path):
    bad = _tampered(tmp_path, lambda g, n: g[n].update(type="Lambda", code="print(1)"))
    with pytest.raises(ValueError, match="Lambda"):
        load_model(bad)


def test_layout_graph_module_must_replace_an_add(tmp_path):
    bad = _tampered(tmp_path, lambda g, n: g[n].update(node="flatten"))
    with pytest.raises(ValueError, match="not an add"):
        load_model(bad)
    bad = _tampered(tmp_path, lambda g, n: g[n].update(a_only=["0"]))
    with pytest.raises(ValueError, match="integers"):
        load_model(bad)


def test_reconstruction_refuses_a_batchnorm_after_the_add():
    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(16)
            self.bn3 = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            x = self.bn1(self.conv1(x))
            y = self.bn3(x + self.bn2(self.conv2(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    with pytest.raises(NotImplementedError, match="follows an add"):
        prune_network(PreAct().eval(), [8, 8], "l1", 0.5, coupling="reconstruct", head=["fc"])
    slim, _ = prune_network(PreAct().eval(), [8, 8], "l1", 0.5, coupling="shared", head=["fc"])
    assert slim.conv1.out_channels == 8
