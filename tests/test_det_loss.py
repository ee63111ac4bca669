"""The detection loss: IoU variants on hand-computed boxes, the neighbouring-cells assignment, and
the loss itself (it fits a target, survives empty batches, is deterministic, refuses bad shapes)."""
import math

import pytest
import torch

from rsedge.trainer.det_loss import DetectionLoss, LossHyp, bbox_iou, build_targets

STRIDES = (8, 16, 32)
INPUT = 64
GRIDS = [(INPUT // s, INPUT // s) for s in STRIDES]
# Per level (w, h) in input pixels: square, wide, tall at 1x, 4x and 16x the smallest.
ANCHORS = torch.tensor([[[8, 8], [16, 8], [8, 16]],
                        [[32, 32], [64, 32], [32, 64]],
                        [[128, 128], [256, 128], [128, 256]]], dtype=torch.float32)


def _xywh(x1, y1, x2, y2):
    return torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dtype=torch.float64)


def _tgt(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


# ---------------------------------------------------------------- IoU variants


def test_known_iou_giou_diou_values():
    a, b = _xywh(0, 0, 2, 2), _xywh(1, 1, 3, 3)
    # intersection 1, union 7, enclosing box 3x3 (area 9, diagonal^2 18), centre distance^2 2
    assert bbox_iou(a, b).item() == pytest.approx(1 / 7)
    assert bbox_iou(a, b, "giou").item() == pytest.approx(1 / 7 - 2 / 9)
    assert bbox_iou(a, b, "diou").item() == pytest.approx(1 / 7 - 2 / 18)
    assert bbox_iou(a, b, "ciou").item() == pytest.approx(1 / 7 - 2 / 18)  # same aspect: v = 0
    assert bbox_iou(a, _xywh(5, 5, 6, 6)).item() == 0.0
    assert bbox_iou(a, a).item() == pytest.approx(1.0)


def test_ciou_equals_iou_for_concentric_same_aspect_boxes():
    a = torch.tensor([[5.0, 5.0, 4.0, 2.0], [0.0, 0.0, 3.0, 9.0]], dtype=torch.float64)
    b = torch.tensor([[5.0, 5.0, 2.0, 1.0], [0.0, 0.0, 1.0, 3.0]], dtype=torch.float64)
    iou = bbox_iou(a, b)
    assert iou.tolist() == pytest.approx([0.25, 1 / 9])
    assert bbox_iou(a, b, "ciou").tolist() == pytest.approx(iou.tolist(), abs=1e-9)
    assert bbox_iou(a, b, "giou").tolist() == pytest.approx(iou.tolist(), abs=1e-9)


def test_ciou_penalises_centre_shift_and_aspect_change():
    a = _xywh(0, 0, 4, 4)
    shifted = _xywh(1, 0, 5, 4)  # IoU 12/20, enclosing 5x4: c^2 = 41, rho^2 = 1
    assert bbox_iou(a, shifted, "ciou").item() == pytest.approx(0.6 - 1 / 41)
    assert bbox_iou(a, shifted, "ciou") < bbox_iou(a, shifted)
    wide = _xywh(0, 1, 4, 3)  # concentric, IoU 0.5, aspect 2:1 vs 1:1
    v = 4 / math.pi ** 2 * (math.atan(2.0) - math.atan(1.0)) ** 2
    alpha = v / (1 - 0.5 + v)
    assert bbox_iou(a, wide, "ciou").item() == pytest.approx(0.5 - alpha * v)


def test_ciou_alpha_carries_no_gradient():
    target = torch.tensor([2.0, 2.0, 4.0, 2.0], dtype=torch.float64)
    pred = torch.tensor([2.5, 1.5, 3.0, 3.0], dtype=torch.float64, requires_grad=True)
    bbox_iou(pred, target, "ciou").backward()
    # the same expression by hand, alpha frozen
    p = pred.detach().clone().requires_grad_(True)
    iou = bbox_iou(p, target)
    cw = torch.maximum(p[0] + p[2] / 2, target[0] + 2) - torch.minimum(p[0] - p[2] / 2, target[0] - 2)
    ch = torch.maximum(p[1] + p[3] / 2, target[1] + 1) - torch.minimum(p[1] - p[3] / 2, target[1] - 1)
    rho2 = (p[0] - target[0]) ** 2 + (p[1] - target[1]) ** 2
    v = 4 / math.pi ** 2 * (math.atan(2.0) - torch.atan(p[2] / p[3])) ** 2
    alpha = (v / (1 - iou + v)).detach()
    (iou - rho2 / (cw ** 2 + ch ** 2) - alpha * v).backward()
    assert torch.allclose(pred.grad, p.grad, atol=1e-6)


def test_unknown_iou_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        bbox_iou(torch.zeros(4), torch.zeros(4), "eiou")


# ---------------------------------------------------------------- assignment


def _slots(level):
    b, a, gy, gx = (t.tolist() for t in level.indices)
    return sorted(zip(b, a, gy, gx))


def test_box_goes_to_its_cell_and_the_two_nearest_neighbours():
    # an 8x8 box centred at grid (3.25, 2.75) on stride 8: left half in x, lower half in y
    cx, cy = 8 * 3.25, 8 * 2.75
    t = _tgt([1, cx - 4, cy - 4, cx + 4, cy + 4])
    levels = build_targets([torch.zeros(0, 5), t], ANCHORS, STRIDES, GRIDS)
    lv0 = levels[0]
    cells = {(2, 3): (0.25, 0.75), (2, 2): (1.25, 0.75), (3, 3): (0.25, -0.25)}  # (gy, gx): (tx, ty)
    assert _slots(lv0) == sorted((1, a, gy, gx) for a in range(3) for gy, gx in cells)
    for (_, a, gy, gx), box, anc, c in zip(zip(*(t.tolist() for t in lv0.indices)), lv0.box,
                                           lv0.anchor_wh, lv0.cls):
        assert box.tolist() == pytest.approx([*cells[(gy, gx)], 1.0, 1.0])
        assert anc.tolist() == pytest.approx((ANCHORS[0, a] / 8).tolist())
        assert c.item() == 1
    # ratio 4 to every 32-px anchor is not < 4, and the 128-px anchors are 16x off
    assert len(levels[1].cls) == 0 and len(levels[2].cls) == 0


def test_box_is_learnt_only_on_levels_whose_anchors_fit_its_shape():
    # 32x32 at stride 16 grid (1.5, 1.5) exactly: frac 0.5 adds no neighbour
    levels = build_targets([_tgt([0, 8, 8, 40, 40])], ANCHORS, STRIDES, GRIDS)
    assert len(levels[0].cls) == 0  # 8x8, 16x8, 8x16 are all 4x off in some side
    assert _slots(levels[1]) == [(0, a, 1, 1) for a in range(3)]
    assert levels[1].box.tolist() == [[0.5, 0.5, 2.0, 2.0]] * 3
    assert len(levels[2].cls) == 0  # 128 / 32 = 4, not < 4


def test_elongated_box_matches_no_anchor():
    # 64x2: against every anchor some side is >= 4x off (16x8: exactly 4, not < 4)
    levels = build_targets([_tgt([0, 0, 31, 64, 33])], ANCHORS, STRIDES, GRIDS)
    assert all(len(lv.cls) == 0 for lv in levels)
    # the anchor threshold is a parameter: with a loose one the wide 16x8 anchor takes it
    loose = build_targets([_tgt([0, 0, 31, 64, 33])], ANCHORS, STRIDES, GRIDS, anchor_t=8.0)
    assert set(loose[0].indices[1].tolist()) == {1}


def test_boxes_at_the_image_edge_stay_inside_the_grid():
    boxes = _tgt([0, 0, 0, 6, 6], [1, 58, 58, 64, 64], [2, 0, 57, 7, 64], [0, 60, -3, 70, 5],
                 [1, 0, 0, 64, 64], [0, 30, 30, 30, 40])  # last one empty: ignored
    levels = build_targets([boxes], ANCHORS, STRIDES, GRIDS)
    assert sum(len(lv.cls) for lv in levels) > 0
    for lv, (gh, gw) in zip(levels, GRIDS):
        _, _, gy, gx = lv.indices
        assert ((gy >= 0) & (gy < gh)).all() and ((gx >= 0) & (gx < gw)).all()
        assert ((lv.box[:, :2] >= -0.5) & (lv.box[:, :2] <= 1.5)).all()
    # every small box sits in an edge cell on the outer side of its centre: no neighbour at all
    # (the one at x 60..70 is clipped to 60..64, centre (62, 2.5))
    square = [(gy, gx) for _, a, gy, gx in _slots(levels[0]) if a == 0]
    assert square == [(0, 0), (0, 7), (7, 0), (7, 7)]
    offsets = {(0, 0): [0.375, 0.375], (0, 7): [0.75, 0.3125], (7, 0): [0.4375, 0.5625],
               (7, 7): [0.625, 0.625]}
    _, _, gy, gx = levels[0].indices
    for y, x, txy in zip(gy.tolist(), gx.tolist(), levels[0].box[:, :2].tolist()):
        assert txy == pytest.approx(offsets[(y, x)])


# ---------------------------------------------------------------- the loss


def _raw_maps(n=2, classes=3, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [(0.1 * torch.randn(n, 3 * (5 + classes), gh, gw, generator=g)).requires_grad_(requires_grad)
            for gh, gw in GRIDS]


def test_fitting_raw_maps_to_one_box_drops_the_box_loss():
    torch.manual_seed(0)
    loss_fn = DetectionLoss(ANCHORS, STRIDES, 3, INPUT)
    params = [torch.nn.Parameter(m) for m in _raw_maps(n=1)]
    targets = [_tgt([2, 14, 16, 34, 28])]  # 20x12 box centred at (24, 22)
    opt = torch.optim.Adam(params, lr=0.05)
    history = []
    for _ in range(100):
        opt.zero_grad()
        total = loss_fn(params, targets)
        total.backward()
        opt.step()
        history.append((total.item(), dict(loss_fn.last)))
    (first, c0), (last, c1) = history[0], history[-1]
    assert c1["box"] < 0.2 * c0["box"]
    assert c1["cls"] < 0.2 * c0["cls"]
    assert c1["obj"] < c0["obj"] and last < 0.5 * first
    assert first == pytest.approx(c0["box"] + c0["obj"] + c0["cls"], rel=1e-5)


def test_images_without_boxes_and_an_empty_batch():
    loss_fn = DetectionLoss(ANCHORS, STRIDES, 3, INPUT)
    maps = _raw_maps(requires_grad=True)
    total = loss_fn(maps, [torch.zeros(0, 5), torch.zeros((0,))])
    assert torch.isfinite(total) and total.item() > 0
    assert loss_fn.last["box"] == 0.0 and loss_fn.last["cls"] == 0.0 and loss_fn.last["obj"] > 0
    total.backward()
    assert all(torch.isfinite(m.grad).all() for m in maps)
    # with no box anywhere every objectness logit is pushed down and nothing else moves
    obj_grad = maps[0].grad.view(2, 3, 8, 8, 8)[:, :, 4]
    assert (obj_grad > 0).all() and maps[0].grad.view(2, 3, 8, 8, 8)[:, :, :4].abs().sum() == 0
    # one image empty, the other not: finite, all three terms present
    total = loss_fn(_raw_maps(), [torch.zeros(0, 5), _tgt([0, 10, 10, 20, 22])])
    assert torch.isfinite(total) and min(loss_fn.last.values()) > 0


def test_loss_is_deterministic_and_per_image_scale():
    loss_fn = DetectionLoss(ANCHORS, STRIDES, 3, INPUT)
    maps = _raw_maps()
    targets = [_tgt([0, 10, 10, 20, 22], [1, 12, 12, 22, 20]), _tgt([2, 30, 5, 60, 40])]
    a = loss_fn(maps, targets)
    last_a = dict(loss_fn.last)
    b = loss_fn([m.clone() for m in maps], [t.clone() for t in targets])
    assert torch.equal(a, b) and loss_fn.last == last_a
    # the same image twice: same loss as once (a mean, not a sum over the batch)
    one = loss_fn([m[:1] for m in maps], targets[:1])
    two = loss_fn([torch.cat([m[:1], m[:1]]) for m in maps], [targets[0], targets[0]])
    assert two.item() == pytest.approx(one.item(), rel=1e-5)


def test_gains_follow_input_size_classes_and_levels():
    hyp = LossHyp(box=0.05, obj=1.0, cls=0.5)
    assert DetectionLoss(ANCHORS, STRIDES, 80, 640, hyp).gains == pytest.approx(
        {"box": 0.05, "obj": 1.0, "cls": 0.5})
    g = DetectionLoss(ANCHORS, STRIDES, 10, (320, 640)).gains
    assert g == pytest.approx({"box": 0.05, "obj": 0.5, "cls": 0.5 * 10 / 80})
    g2 = DetectionLoss(ANCHORS[:2], STRIDES[:2], 80, 640, LossHyp(balance=(4.0, 1.0))).gains
    assert g2["box"] == pytest.approx(0.05 * 1.5)


def test_label_smoothing_and_low_precision_inputs():
    targets = [_tgt([1, 10, 10, 20, 22]), _tgt([0, 30, 5, 60, 40])]
    maps = _raw_maps()
    plain = DetectionLoss(ANCHORS, STRIDES, 3, INPUT)
    smooth = DetectionLoss(ANCHORS, STRIDES, 3, INPUT, LossHyp(label_smoothing=0.1))
    plain(maps, targets)
    smooth(maps, targets)
    assert smooth.last["cls"] != plain.last["cls"] and smooth.last["box"] == plain.last["box"]
    low = plain([m.to(torch.bfloat16) for m in maps], targets)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(plain(maps, targets).item(), rel=0.05)


def test_bad_shapes_and_classes_are_refused():
    loss_fn = DetectionLoss(ANCHORS, STRIDES, 3, INPUT)
    maps = _raw_maps()
    with pytest.raises(ValueError, match="level 1 map"):
        loss_fn([maps[0], maps[1][:, :-1], maps[2]], [torch.zeros(0, 5)] * 2)
    with pytest.raises(ValueError, match="2 output maps for 3 levels"):
        loss_fn(maps[:2], [torch.zeros(0, 5)] * 2)
    with pytest.raises(ValueError, match="1 target tensors for a batch of 2"):
        loss_fn(maps, [torch.zeros(0, 5)])
    with pytest.raises(ValueError, match="class outside 0..2"):
        loss_fn(maps, [torch.zeros(0, 5), _tgt([3, 1, 1, 5, 5])])
    with pytest.raises(ValueError, match="balance has 3 values for 2 levels"):
        DetectionLoss(ANCHORS[:2], STRIDES[:2], 3, INPUT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    loss_fn = DetectionLoss(ANCHORS, STRIDES, 3, INPUT)
    maps = _raw_maps()
    targets = [_tgt([0, 10, 10, 20, 22], [1, 12, 12, 22, 20]), _tgt([2, 30, 5, 60, 40])]
    cpu = loss_fn(maps, targets).item()
    with torch.autocast("cuda", dtype=torch.float16):
        gpu = loss_fn([m.cuda().half() for m in maps], targets)  # targets stay on the CPU
    assert gpu.dtype == torch.float32 and gpu.item() == pytest.approx(cpu, rel=1e-2)
    assert loss_fn([m.cuda() for m in maps], targets).item() == pytest.approx(cpu, rel=1e-5)
