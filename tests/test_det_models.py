"""The YOLOv5-v6-style detector of the registry: raw level shapes, sizes against the published
YOLOv5s/n counts, activations, torch.fx and Torch-Pruning, the decode formula and its exportable
form (opset 13, no ScatterND / Range / NonZero / Shape, same numbers in ONNX Runtime)."""
import math
import operator

import numpy as np
import pytest
import torch
from torch import nn

from rsedge.trainer import det_models
from rsedge.trainer.det_models import (
    DEFAULT_ANCHORS,
    DetectExport,
    YOLODetector,
    check_input_size,
    decode,
    detect_layers,
)
from rsedge.trainer.models import create_model, get_spec, head_modules


def params(model):
    return sum(p.numel() for p in model.parameters())


def small(num_classes=3, act="silu"):
    torch.manual_seed(0)
    return create_model("yolo_n", num_classes, act=act).eval()


def test_registry_specs():
    for name in ("yolo_n", "yolo_s"):
        spec = get_spec(name)
        assert spec.task == "detection" and spec.outputs == ("boxes", "scores")
        assert spec.head == ("detect.0", "detect.1", "detect.2") and spec.input_size == (640, 640)
        assert spec.normalization == {"mean": [0, 0, 0], "std": [1, 1, 1]}
        assert spec.args["act"] == "silu" and spec.args["anchors"] == DEFAULT_ANCHORS
    model = small()
    assert [type(m) for m in head_modules(model)] == [nn.Conv2d] * 3
    assert detect_layers(model) == ["detect.0", "detect.1", "detect.2"]
    assert model.anchors.shape == (3, 3, 2) and model.anchors.dtype == torch.float32
    assert model.strides == (8, 16, 32) and model.num_classes == 3
    assert "anchors" in model.state_dict()
    with pytest.raises(ValueError, match="not a YOLODetector"):
        detect_layers(nn.Sequential(nn.Conv2d(3, 3, 1)))


@pytest.mark.parametrize("size", [(320, 320), (256, 320)])
def test_raw_output_shapes(size):
    h, w = size
    with torch.no_grad():
        out = small()(torch.rand(2, 3, h, w))
    assert [tuple(o.shape) for o in out] == [(2, 3 * 8, h // s, w // s) for s in (8, 16, 32)]


def test_input_size_must_be_multiple_of_32():
    assert check_input_size(640) == (640, 640) and check_input_size((256, 320)) == (256, 320)
    with pytest.raises(ValueError, match=r"input 300x320: detection models .* multiples of 32, e.g. 288x320"):
        check_input_size((300, 320))
    with pytest.raises(ValueError, match="multiples of 32"):
        small()(torch.zeros(1, 3, 100, 128))


def test_parameter_counts_match_the_published_sizes():
    n, s = params(create_model("yolo_n", 80)), params(create_model("yolo_s", 80))
    assert n < s
    assert abs(s - 7.2e6) / 7.2e6 < 0.05, s  # YOLOv5s v6 at 80 classes: 7.2 M
    assert abs(n - 1.9e6) / 1.9e6 < 0.05, n  # YOLOv5n: 1.9 M


def test_activation_choice_and_bad_arguments():
    relu = small(act="relu")
    assert not any(isinstance(m, nn.SiLU) for m in relu.modules())
    assert any(isinstance(m, nn.ReLU) for m in relu.modules())
    assert any(isinstance(m, nn.SiLU) for m in small().modules())
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        YOLODetector(3, act="gelu")
    with pytest.raises(ValueError, match="anchors must be 3 levels"):
        YOLODetector(3, anchors=[[10, 13], [16, 30]])
    with pytest.raises(ValueError, match="num_classes"):
        YOLODetector(0)


def test_residual_adds_only_in_backbone_bottlenecks():
    model = small()
    adds = [n for n, m in model.named_modules() if isinstance(m, det_models.Bottleneck) and m.add]
    plain = [n for n, m in model.named_modules() if isinstance(m, det_models.Bottleneck) and not m.add]
    assert adds and all(n.startswith("backbone.c3_") for n in adds)
    assert plain and all(n.startswith("neck.") for n in plain)
    assert len(adds) == 1 + 2 + 3 + 1  # depth 0.33: repeats 3/6/9/3 -> 1/2/3/1
    graph_adds = [n for n in torch.fx.symbolic_trace(model).graph.nodes
                  if n.op == "call_function" and n.target in (operator.add, torch.add)]
    assert len(graph_adds) == len(adds)


def test_detect_biases_start_at_the_prior_probabilities():
    model = small(num_classes=4)
    for conv, stride in zip(model.detect, (8, 16, 32)):
        b = conv.bias.detach().view(3, 9)
        assert torch.allclose(b[:, 4], torch.tensor(math.log(8 / (640 / stride) ** 2)))
        assert torch.allclose(b[:, 5:], torch.tensor(math.log(0.6 / (4 - 0.99))))


def test_fx_trace_equals_eager():
    model = small()
    gm = torch.fx.symbolic_trace(model)
    x = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        for a, b in zip(model(x), gm(x)):
            assert torch.equal(a, b)
    assert {"detect.0", "detect.1", "detect.2", "backbone.c3_1.m.0.cv2.conv"} <= dict(gm.named_modules()).keys()


def test_torch_pruning_magnitude_pruner_keeps_the_detect_convs():
    import torch_pruning as tp

    model = small()
    example = torch.rand(1, 3, 128, 128)
    before = params(model)
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.25, ignored_layers=list(model.detect))
    pruner.step()
    assert params(model) < 0.8 * before
    assert all(c.out_channels == 3 * 8 for c in model.detect)
    assert model.backbone.c3_2.cv3.conv.out_channels < 64
    with torch.no_grad():
        out = model(example)
    assert [tuple(o.shape) for o in out] == [(1, 24, 16, 16), (1, 24, 8, 8), (1, 24, 4, 4)]
    decode(out, model.anchors)


def raw_zeros(n, classes, size):
    return [torch.zeros(n, 3 * (5 + classes), size[0] // s, size[1] // s) for s in (8, 16, 32)]


def test_decode_of_zero_logits_puts_anchor_boxes_at_cell_centres():
    anchors = torch.tensor(DEFAULT_ANCHORS, dtype=torch.float32)
    boxes, scores = decode(raw_zeros(2, 2, (64, 96)), anchors)
    assert boxes.shape == (2, 3 * (8 * 12 + 4 * 6 + 2 * 3), 4) and scores.shape == (2, boxes.shape[1], 2)
    assert torch.allclose(scores, torch.full_like(scores, 0.25))
    start = 0
    for level, (stride, (h, w)) in enumerate(zip((8, 16, 32), ((8, 12), (4, 6), (2, 3)))):
        rows = boxes[0, start:start + 3 * h * w].view(3, h, w, 4)
        start += 3 * h * w
        centre = (rows[..., :2] + rows[..., 2:]) / 2
        wh = rows[..., 2:] - rows[..., :2]
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        assert torch.allclose(centre[..., 0], ((xs + 0.5) * stride).float().expand(3, h, w))
        assert torch.allclose(centre[..., 1], ((ys + 0.5) * stride).float().expand(3, h, w))
        assert torch.allclose(wh, anchors[level][:, None, None, :].expand(3, h, w, 2))


def test_decode_row_order_and_formula_on_a_marked_cell():
    raw = raw_zeros(1, 2, (64, 96))
    cell = raw[1].view(1, 3, 7, 4, 6)[0, 2, :, 1, 3]  # level 1, anchor 2, y 1, x 3
    cell[0], cell[3], cell[4], cell[6] = 30.0, 30.0, -30.0, 30.0  # tx, th saturate; obj 0; cls 1
    boxes, scores = decode(raw, DEFAULT_ANCHORS)
    row = 3 * 8 * 12 + 2 * 4 * 6 + 1 * 6 + 3
    x1, y1, x2, y2 = boxes[0, row].tolist()
    aw, ah = DEFAULT_ANCHORS[1][2]
    assert (x1 + x2) / 2 == pytest.approx((2 - 0.5 + 3) * 16)  # p_x = 1
    assert (y1 + y2) / 2 == pytest.approx((1 - 0.5 + 1) * 16)  # p_y = 0.5
    assert x2 - x1 == pytest.approx(aw) and y2 - y1 == pytest.approx(4 * ah)  # p_h = 1: (2 p)^2 = 4
    assert scores[0, row].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert torch.allclose(scores[0, row + 1], torch.tensor([0.25, 0.25]))


def test_decode_matches_a_per_cell_reference():
    torch.manual_seed(1)
    raw = [torch.randn(2, 3 * 7, h, w) for h, w in ((8, 4), (4, 2), (2, 1))]
    boxes, scores = decode(raw, DEFAULT_ANCHORS)
    ref_boxes, ref_scores = [], []
    for level, (r, stride) in enumerate(zip(raw, (8, 16, 32))):
        p = r.sigmoid().view(2, 3, 7, r.shape[2], r.shape[3])
        for a in range(3):
            for y in range(r.shape[2]):
                for x in range(r.shape[3]):
                    q = p[:, a, :, y, x]
                    cx, cy = (2 * q[:, 0] - 0.5 + x) * stride, (2 * q[:, 1] - 0.5 + y) * stride
                    aw, ah = DEFAULT_ANCHORS[level][a]
                    bw, bh = (2 * q[:, 2]) ** 2 * aw, (2 * q[:, 3]) ** 2 * ah
                    ref_boxes.append(torch.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), 1))
                    ref_scores.append(q[:, 4:5] * q[:, 5:])
    assert torch.allclose(boxes, torch.stack(ref_boxes, 1), atol=1e-4)
    assert torch.allclose(scores, torch.stack(ref_scores, 1), atol=1e-6)


def test_detect_export_onnx_has_no_shape_ops_and_matches_decode(tmp_path):
    import onnx
    import onnxruntime as ort

    model = small()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is exercised
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    wrapped = DetectExport(model, (128, 160)).eval()
    path = tmp_path / "det.onnx"
    torch.onnx.export(wrapped, (torch.zeros(1, 3, 128, 160),), str(path), opset_version=13, dynamo=False,
                      input_names=["input"], output_names=["boxes", "scores"])
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"ScatterND", "Range", "NonZero", "Shape", "Size", "ConstantOfShape", "Gather", "Expand"}
    assert {"Conv", "Sigmoid", "Resize", "Concat"} <= ops
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        ref_boxes, ref_scores = decode(model(x), model.anchors)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores = sess.run(["boxes", "scores"], {"input": x.numpy()})
    assert boxes.shape == (1, 3 * (16 * 20 + 8 * 10 + 4 * 5), 4) and scores.shape == (1, boxes.shape[1], 3)
    np.testing.assert_allclose(boxes, ref_boxes.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-5, atol=1e-4)


def test_detect_export_of_a_traced_copy_needs_the_anchors():
    model = small()
    gm = torch.fx.symbolic_trace(model)
    with pytest.raises(ValueError, match="carries no anchors"):
        DetectExport(gm, 128)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        a = DetectExport(gm, 128, anchors=DEFAULT_ANCHORS)(x)
        b = DetectExport(model, 128)(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="multiples of 32"):
        DetectExport(model, (128, 100))
