"""The YOLO-style detection training loss: CIoU box regression, IoU-targeted objectness and
per-class BCE, with the "neighbouring cells" target assignment.

Written from the published maths (Redmon & Farhadi's anchor parametrisation, Zheng et al. 2020
for DIoU/CIoU, Rezatofighi et al. 2019 for GIoU, and the widely described YOLOv5 rules: anchor
shape ratio < anchor_t, a box assigned to its own cell plus the nearest horizontal and vertical
neighbour, centre offsets decoded as 2*sigmoid - 0.5 in [-0.5, 1.5], sizes as (2*sigmoid)^2 *
anchor in [0, 4] * anchor).

Shapes follow /work/notes/det_contract.md: the model returns one raw map per level,
(N, A*(5+C), H, W), whose channels are [tx, ty, tw, th, obj, cls_0..cls_{C-1}] per anchor; targets
are one (K, 5) tensor per image, [cls, x1, y1, x2, y2] in input pixels (K may be 0).

Scale: every term is a mean (over assigned anchors, or over all cells for objectness), so the total
is per image and does not grow with the batch size; multiply by the batch size yourself if you want
the "sum over the batch" convention some trainers use with SGD.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IOU_KINDS = ("iou", "giou", "diou", "ciou")


def bbox_iou(a: Tensor, b: Tensor, kind: str = "iou", eps: float = 1e-7) -> Tensor:
    """IoU (or GIoU / DIoU / CIoU) of elementwise pairs of boxes in xywh-centre form.

    `a` and `b` are (..., 4) [cx, cy, w, h] and broadcast against each other; the result is (...).
    xywh-centre because that is what the loss decodes; CIoU's alpha = v / (1 - IoU + v) is treated
    as a constant (no gradient), as Zheng et al. prescribe, so only v's own gradient steers aspect.
    """
    if kind not in IOU_KINDS:
        raise ValueError(f"bbox_iou: kind must be one of {', '.join(IOU_KINDS)}, not {kind!r}")
    (ax, ay, aw, ah), (bx, by, bw, bh) = a.unbind(-1), b.unbind(-1)
    a1x, a2x, a1y, a2y = ax - aw / 2, ax + aw / 2, ay - ah / 2, ay + ah / 2
    b1x, b2x, b1y, b2y = bx - bw / 2, bx + bw / 2, by - bh / 2, by + bh / 2
    inter = ((torch.minimum(a2x, b2x) - torch.maximum(a1x, b1x)).clamp(min=0)
             * (torch.minimum(a2y, b2y) - torch.maximum(a1y, b1y)).clamp(min=0))
    union = aw * ah + bw * bh - inter + eps
    iou = inter / union
    if kind == "iou":
        return iou
    cw = torch.maximum(a2x, b2x) - torch.minimum(a1x, b1x)
    ch = torch.maximum(a2y, b2y) - torch.minimum(a1y, b1y)
    if kind == "giou":
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area
    c2 = cw ** 2 + ch ** 2 + eps
    rho2 = (bx - ax) ** 2 + (by - ay) ** 2
    if kind == "diou":
        return iou - rho2 / c2
    v = (4 / math.pi ** 2) * (torch.atan(bw / (bh + eps)) - torch.atan(aw / (ah + eps))) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + alpha * v)


class LevelTargets(NamedTuple):
    """What one pyramid level has to learn: n assigned (image, anchor, cell) slots.

    indices: (image, anchor, gy, gx), each (n,) int64; box: (n, 4) [tx, ty, w, h] with tx, ty the
    centre relative to the cell's corner (in [-0.5, 1.5]) and w, h in grid units; anchor_wh: (n, 2)
    the matched anchor in grid units; cls: (n,) int64.
    """

    indices: tuple[Tensor, Tensor, Tensor, Tensor]
    box: Tensor
    anchor_wh: Tensor
    cls: Tensor


def _stack_targets(targets: Sequence[Tensor], device: torch.device) -> Tensor:
    """One (M, 6) float32 table [image, cls, x1, y1, x2, y2] from the per-image (K, 5) tensors."""
    rows = []
    for i, t in enumerate(targets):
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1, 5)
        rows.append(torch.cat([torch.full((len(t), 1), float(i), device=device), t], 1))
    return torch.cat(rows, 0) if rows else torch.zeros((0, 6), device=device)


def _neighbour_offsets(centre: Tensor, cell: Tensor,
                       grid_wh: Tensor) -> list[tuple[Tensor, tuple[int, int]]]:
    """(mask, (dx, dy)) for the own cell and the nearest horizontal / vertical neighbour.

    A centre in the left half of its cell also goes to the cell on the left (its predicted offset
    1 + frac stays below 1.5), one in the right half to the cell on the right; likewise in y. Never
    past the grid edge; a fractional part of exactly 0.5 adds no neighbour.
    """
    frac = centre - centre.floor()
    own = torch.ones(len(centre), dtype=torch.bool, device=centre.device)
    out = [(own, (0, 0))]
    for axis, (lo, hi) in enumerate((((-1, 0), (1, 0)), ((0, -1), (0, 1)))):
        out.append(((frac[:, axis] < 0.5) & (cell[:, axis] > 0), lo))
        out.append(((frac[:, axis] > 0.5) & (cell[:, axis] < grid_wh[axis] - 1), hi))
    return out


def _assign_level(table: Tensor, anchors_px: Tensor, stride: float, grid_hw: tuple[int, int],
                  anchor_t: float) -> LevelTargets:
    """Match every box to this level's anchors by shape ratio and spread it over its cells."""
    device = table.device
    gh, gw = grid_hw
    xyxy = table[:, 2:6].clone()
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, gw * stride)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, gh * stride)
    wh = (xyxy[:, 2:] - xyxy[:, :2]) / stride
    centre = (xyxy[:, :2] + xyxy[:, 2:]) / (2 * stride)
    anc = anchors_px.to(device=device, dtype=torch.float32) / stride
    ratio = wh[None] / anc[:, None]
    worst = torch.maximum(ratio, 1 / ratio).amax(2)
    ok = (worst < anchor_t) & (wh > 0).all(1)[None]
    a_idx, m_idx = ok.nonzero(as_tuple=True)
    centre, wh = centre[m_idx], wh[m_idx]
    grid_wh = torch.tensor([gw, gh], device=device)
    cell = centre.floor().long().clamp(min=torch.zeros_like(grid_wh), max=grid_wh - 1)
    parts = [[] for _ in range(6)]
    for mask, (dx, dy) in _neighbour_offsets(centre, cell, grid_wh):
        c = cell[mask] + torch.tensor([dx, dy], device=device)
        parts[0].append(m_idx[mask])
        parts[1].append(a_idx[mask])
        parts[2].append(c[:, 1])
        parts[3].append(c[:, 0])
        parts[4].append(torch.cat([centre[mask] - c, wh[mask]], 1))
        parts[5].append(anc[a_idx[mask]])
    rows, a, gy, gx, box, anchor_wh = (torch.cat(p, 0) for p in parts)
    image = table[rows, 0].long()
    return LevelTargets((image, a, gy, gx), box, anchor_wh, table[rows, 1].long())


def build_targets(targets: Sequence[Tensor], anchors: Tensor, strides: Sequence[float],
                  grid_sizes: Sequence[tuple[int, int]], anchor_t: float = 4.0) -> list[LevelTargets]:
    """Per-level training targets for per-image (K, 5) [cls, x1, y1, x2, y2] input-pixel boxes.

    anchors: (L, A, 2) (w, h) in input pixels; grid_sizes: (H_l, W_l) per level. A (box, anchor)
    pair matches when max(w/aw, aw/w, h/ah, ah/h) < anchor_t; each match goes to the cell holding
    the centre and to up to two neighbours (see `_neighbour_offsets`), so one box gives up to
    3 * A slots per level and may be learnt on several levels. Boxes are clipped to the input
    first; empty ones are ignored.
    """
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    if not (len(anchors) == len(strides) == len(grid_sizes)):
        raise ValueError(f"build_targets: {len(anchors)} anchor levels, {len(strides)} strides and "
                         f"{len(grid_sizes)} grids: they must agree")
    device = anchors.device
    table = _stack_targets(targets, device)
    return [_assign_level(table, anchors[lvl], float(strides[lvl]), tuple(grid_sizes[lvl]), anchor_t)
            for lvl in range(len(strides))]


@dataclass
class LossHyp:
    """Loss weights. box / obj / cls are the gains at 640x640, 80 classes and 3 levels; the loss
    rescales obj by (input area / 640^2), cls by C/80, and all three by 3/num_levels, so the
    balance between terms holds for other sizes and class counts."""

    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    balance: tuple[float, ...] = (4.0, 1.0, 0.4)
    anchor_t: float = 4.0
    label_smoothing: float = 0.0


def _input_hw(input_size) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    h, w = (int(v) for v in input_size)
    return h, w


class DetectionLoss:
    """Total = box + obj + cls for a YOLO-style detector's raw maps; see the module docstring.

    `loss(outputs, targets)` returns a float32 scalar tensor (per-image mean scale, NOT multiplied
    by the batch size) and leaves the three weighted components as floats in `self.last`.
    Inputs under autocast (fp16/bf16 maps) are computed in float32. Targets may live on any device.
    """

    def __init__(self, anchors, strides: Sequence[float], num_classes: int, input_size,
                 hyp: LossHyp | None = None):
        self.anchors = torch.as_tensor(anchors, dtype=torch.float32).detach().cpu().clone()
        self.strides = tuple(float(s) for s in strides)
        self.num_classes = int(num_classes)
        self.hyp = hyp or LossHyp()
        nl = len(self.strides)
        if self.anchors.ndim != 3 or self.anchors.shape[0] != nl or self.anchors.shape[2] != 2:
            raise ValueError(f"DetectionLoss: anchors must be ({nl}, A, 2) for {nl} strides, "
                             f"got {tuple(self.anchors.shape)}")
        if len(self.hyp.balance) != nl:
            raise ValueError(f"DetectionLoss: LossHyp.balance has {len(self.hyp.balance)} values "
                             f"for {nl} levels")
        if self.num_classes < 1:
            raise ValueError(f"DetectionLoss: num_classes must be >= 1, got {num_classes}")
        h, w = _input_hw(input_size)
        level = 3.0 / nl
        self.gains = {"box": self.hyp.box * level,
                      "obj": self.hyp.obj * (h * w) / (640.0 * 640.0) * level,
                      "cls": self.hyp.cls * self.num_classes / 80.0 * level}
        self.last: dict[str, float] = {}

    def _maps(self, outputs: Sequence[Tensor]) -> list[Tensor]:
        """(N, A, H, W, 5+C) float32 views of the raw maps, after checking their shapes."""
        if len(outputs) != len(self.strides):
            raise ValueError(f"DetectionLoss: {len(outputs)} output maps for {len(self.strides)} levels")
        a, no = self.anchors.shape[1], 5 + self.num_classes
        maps = []
        for lvl, p in enumerate(outputs):
            if p.ndim != 4 or p.shape[1] != a * no:
                raise ValueError(f"DetectionLoss: level {lvl} map has shape {tuple(p.shape)}, "
                                 f"expected (N, {a * no}, H, W) for {a} anchors and "
                                 f"{self.num_classes} classes")
            n, _, h, w = p.shape
            maps.append(p.float().view(n, a, no, h, w).permute(0, 1, 3, 4, 2))
        return maps

    def _check_targets(self, targets: Sequence[Tensor], batch: int) -> None:
        if len(targets) != batch:
            raise ValueError(f"DetectionLoss: {len(targets)} target tensors for a batch of {batch}")
        for i, t in enumerate(targets):
            if t.numel() and (t.ndim != 2 or t.shape[1] != 5):
                raise ValueError(f"DetectionLoss: target {i} must be (K, 5) [cls, x1, y1, x2, y2], "
                                 f"got {tuple(t.shape)}")
            if t.numel() and ((t[:, 0] < 0).any() or (t[:, 0] >= self.num_classes).any()):
                raise ValueError(f"DetectionLoss: target {i} has a class outside "
                                 f"0..{self.num_classes - 1}")

    def _level(self, p: Tensor, tg: LevelTargets, balance: float) -> tuple[Tensor, Tensor, Tensor]:
        """(box, obj, cls) unweighted terms of one level; box/cls are 0 when nothing is assigned."""
        tobj = torch.zeros(p.shape[:4], device=p.device, dtype=p.dtype)
        box = cls = p.new_zeros(())
        if len(tg.cls):
            b, a, gy, gx = tg.indices
            ps = p[b, a, gy, gx]
            pxy = ps[:, :2].sigmoid() * 2 - 0.5
            pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * tg.anchor_wh
            ciou = bbox_iou(torch.cat([pxy, pwh], 1), tg.box, kind="ciou")
            box = (1.0 - ciou).mean()
            flat = ((b * p.shape[1] + a) * p.shape[2] + gy) * p.shape[3] + gx
            tobj.view(-1).scatter_reduce_(0, flat, ciou.detach().clamp(min=0), reduce="amax")
            eps = self.hyp.label_smoothing
            tcls = torch.full_like(ps[:, 5:], 0.5 * eps)
            tcls[torch.arange(len(tg.cls), device=p.device), tg.cls] = 1.0 - 0.5 * eps
            cls = F.binary_cross_entropy_with_logits(ps[:, 5:], tcls)
        obj = F.binary_cross_entropy_with_logits(p[..., 4], tobj) * balance
        return box, obj, cls

    def __call__(self, outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        device_type = outputs[0].device.type if len(outputs) else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            maps = self._maps(outputs)
            self._check_targets(targets, maps[0].shape[0])
            device = maps[0].device
            level_targets = build_targets([t.to(device) for t in targets], self.anchors.to(device),
                                          self.strides, [m.shape[2:4] for m in maps],
                                          self.hyp.anchor_t)
            terms = [self._level(p, tg, bal)
                     for p, tg, bal in zip(maps, level_targets, self.hyp.balance)]
            box, obj, cls = (torch.stack(t).sum() for t in zip(*terms))
            box, obj, cls = box * self.gains["box"], obj * self.gains["obj"], cls * self.gains["cls"]
            total = box + obj + cls
        self.last = {"box": float(box.detach()), "obj": float(obj.detach()), "cls": float(cls.detach())}
        return total
