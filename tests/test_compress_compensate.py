"""--compensate: the constant a removed channel still emits (its BatchNorm shift through the
activation) is folded into the consumer, exactly for 1x1 consumers."""
import pytest
import torch
from torch import nn

from rsedge.compress.prune import prune_network


class Net(nn.Module):
    def __init__(self, k2: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, k2, padding=k2 // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _net(k2):
    torch.manual_seed(0)
    m = Net(k2).eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(0.2, 1.0)  # positive shifts: they pass the ReLU and carry a constant
            bn.running_var.uniform_(0.5, 1.5)
        m.bn1.weight[::2] = 0.0  # eight channels already silenced by sparse training, shift kept
    return m


def _run(k2, compensate):
    m = _net(k2)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x)
    inputs = torch.randn(8, 3, 8, 8) if compensate else None
    slim, report = prune_network(m, [8, 8], "bn-scale", None, threshold=1e-6, min_channels=1, head=["fc"],
                                 compensate_inputs=inputs)
    assert slim.conv1.out_channels == 8 and slim.conv2.in_channels == 8
    with torch.no_grad():
        return (slim(x) - ref).abs().max().item(), report


def test_compensation_is_exact_for_1x1_consumers():
    err_plain, _ = _run(1, compensate=False)
    err, report = _run(1, compensate=True)
    assert err_plain > 1e-2  # dropping the constants changes the function...
    assert err < 1e-5  # ...folding them restores it
    comp = report["compensation"]
    (row,) = comp["consumers"]
    assert row["consumer"] == "conv2" and row["channels"] == 8 and row["exact"] is True
    assert row["into"] == "running mean of the following BatchNorm"
    assert comp["folded"] > 0 and comp["dropped"] == pytest.approx(0, abs=1e-6)


def test_compensation_is_approximate_for_padded_kxk_consumers():
    err_plain, _ = _run(3, compensate=False)
    err, report = _run(3, compensate=True)
    assert err < err_plain / 2
    assert report["compensation"]["consumers"][0]["exact"] is False


def test_a_consumer_without_bias_or_batchnorm_gets_a_new_bias():
    class NoBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.conv2 = nn.Conv2d(16, 8, 1, bias=False)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))

    torch.manual_seed(0)
    m = NoBN().eval()
    with torch.no_grad():
        m.bn1.bias.uniform_(0.2, 1.0)
        m.bn1.weight[::2] = 0.0
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
    slim, report = prune_network(m, [8, 8], "bn-scale", None, threshold=1e-6, min_channels=1, head=["fc"],
                                 compensate_inputs=torch.randn(4, 3, 8, 8))
    assert report["compensation"]["consumers"][0]["into"] == "new bias" and slim.conv2.bias is not None
    with torch.no_grad():
        assert (slim(x) - ref).abs().max() < 1e-5


def test_model_files_record_a_conv_bias_that_pruning_added(tmp_path):
    from rsedge.trainer.modelfile import load_model, save_model
    from rsedge.trainer.models import create_model

    m = create_model("resnet18", 3).eval()
    m.layer1[0].conv1.bias = nn.Parameter(torch.randn(64))
    meta = {"arch": "resnet18", "classes": ["a", "b", "c"], "input_size": [32, 32],
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    path = save_model(tmp_path / "m.safetensors", m, meta)
    loaded, meta = load_model(path)
    assert meta["layout"]["layers"]["layer1.0.conv1"]["bias"] is True
    assert torch.equal(loaded.layer1[0].conv1.bias, m.layer1[0].conv1.bias)
