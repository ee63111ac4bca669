import numpy as np
import onnx
import pytest
import torch
from torch import nn

from rsedge.export.int8_guard import fake_quantize, quantize_with_guard, sqnr_db
from rsedge.export.onnx_export import run_onnx


class Sensitive(nn.Module):
    """conv2 writes one channel 1000x larger than the rest and conv3 all but ignores it: the float
    network is fine, but one int8 scale for conv2's output crushes every other channel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)
        with torch.no_grad():
            self.conv2.weight[0] *= 1000.0
            self.conv2.bias[0] *= 1000.0
            self.conv3.weight[:, 0] /= 1e5
            self.fc.bias.zero_()
            self.fc.weight *= 20.0

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def sensitive_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("guard") / "m.onnx"
    torch.onnx.export(Sensitive().eval(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}})
    rng = np.random.default_rng(0)
    # per-image colour offsets make the pooled features, and so the predictions, differ by image
    images = (rng.standard_normal((200, 3, 16, 16)) + 2 * rng.standard_normal((200, 3, 1, 1))).astype(np.float32)
    labels = run_onnx(path, images).argmax(1)  # FP32 top-1 is 1.0 by construction
    assert len(set(labels.tolist())) >= 3
    return path, images, labels


def test_sqnr_and_fake_quantize():
    x = np.linspace(-1, 1, 101)
    q = fake_quantize(x, np.array(1 / 127), np.array(0, np.int8))
    assert np.max(np.abs(q - x)) <= 0.5 / 127 + 1e-12
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x + 0.1 * np.abs(x).max()) == pytest.approx(10 * np.log10(np.sum(x**2) / (101 * 0.01)))


def test_guard_keeps_the_sensitive_layer_in_float(tmp_path, sensitive_onnx):
    path, images, labels = sensitive_onnx
    plain = quantize_with_guard(path, tmp_path / "plain.onnx", images[:64], images[64:], labels[64:], max_drop=None,
                                log=lambda m: None)
    assert plain["drop_points"] > 5, "the model must really be sensitive for this test to mean anything"
    guarded = quantize_with_guard(path, tmp_path / "guarded.onnx", images[:64], images[64:], labels[64:],
                                  max_drop=1.0, log=lambda m: None)
    assert guarded["within_budget"] and guarded["drop_points"] <= 1.0
    assert 0 < len(guarded["kept_in_float"]) < len(guarded["sensitivity"])
    assert guarded["sensitivity"][0]["node"] in guarded["kept_in_float"]
    assert "Conv" in guarded["sensitivity"][0]["op"] or guarded["sensitivity"][0]["op"] == "Relu"
    assert len(guarded["attempts"]) >= 2 and guarded["attempts"][0]["excluded"] == []
    q = onnx.load(str(tmp_path / "guarded.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node), "the rest stays int8"
    acc = float(np.mean(run_onnx(tmp_path / "guarded.onnx", images[64:]).argmax(1) == labels[64:]))
    assert acc == pytest.approx(guarded["int8_top1"])
