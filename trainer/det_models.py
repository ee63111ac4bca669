"""The detectors of the registry: a YOLOv5-v6-style anchor-based family (`yolo_n`, `yolo_s`),
written from the published architecture (Conv-BN-act blocks, CSP "C3" blocks, SPPF, a PAN neck,
three anchor-based detect convs at strides 8/16/32). No Ultralytics / YOLOv5 code is used or
copied: both are AGPL-3.0.

Layout (width w scales the channels 64/128/256/512/1024, rounded up to multiples of 8; depth d
the C3 repeats 3/6/9/3, max(round(n * d), 1)):

    backbone.stem     Conv 6x6 s2                       stride 2
    backbone.down1    Conv 3x3 s2, backbone.c3_1 C3(3)  stride 4
    backbone.down2    Conv 3x3 s2, backbone.c3_2 C3(6)  stride 8   -> P3 lateral
    backbone.down3    Conv 3x3 s2, backbone.c3_3 C3(9)  stride 16  -> P4 lateral
    backbone.down4    Conv 3x3 s2, backbone.c3_4 C3(3)  stride 32
    backbone.sppf     SPPF                              stride 32  -> P5
    neck.lat5, neck.up5, neck.td4      1x1 conv, nearest x2, concat with P4, C3
    neck.lat4, neck.up4, neck.out3     1x1 conv, nearest x2, concat with P3, C3  -> stride 8
    neck.down3, neck.out4              3x3 s2 conv, concat with neck.lat4, C3     -> stride 16
    neck.down4, neck.out5              3x3 s2 conv, concat with neck.lat5, C3     -> stride 32
    detect.0, detect.1, detect.2       1x1 Conv2d (bias) to A * (5 + C) per level: the head

Residual adds (what L1RR's residual reconstruction rewrites): only in the bottlenecks of the
backbone's C3 blocks, `backbone.c3_{1..4}.m.{i}` computes `x + cv2(cv1(x))`, x being the output of
the C3's `cv1` (for i = 0) or of the previous bottleneck, so every add of one C3 shares the channel
space of `c3_k.cv1.conv` and `c3_k.m.*.cv2.conv`. The neck's C3 blocks have no add (shortcut off);
the SPPF and the neck join tensors by concatenation only.

L_FA's "detection layers" are the INPUTS of the detect convs (`detect_layers(model)`): the outputs
of `neck.out3`, `neck.out4`, `neck.out5`.

Raw outputs and their decode follow the detection contract: level l gives (N, A*(5+C), H/s, W/s),
viewed as (N, A, 5+C, H, W) = [tx, ty, tw, th, obj, cls...]; `decode` and the exportable
`DetectExport` share one formula. BatchNorms use eps 1e-3 and momentum 0.03 as published for
this family (steadier statistics with the small batches detection trains on); the detect biases
start at the prior-probability values of Lin et al. (focal loss): about 8 objects per 640x640
image spread over the cells of a level, and a class probability of 0.6 / (C - 0.99).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .models import ModelSpec, register_model

INPUT_MULTIPLE = 32
DET_INPUT_SIZE = (640, 640)
STRIDES = (8, 16, 32)
DETECT_HEAD = ("detect.0", "detect.1", "detect.2")
# The COCO anchors of the YOLOv3/v5 papers, (w, h) in input pixels at 640, per level P3/P4/P5.
DEFAULT_ANCHORS = [[[10, 13], [16, 30], [33, 23]],
                   [[30, 61], [62, 45], [59, 119]],
                   [[116, 90], [156, 198], [373, 326]]]
BN_EPS, BN_MOMENTUM = 1e-3, 0.03
ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU}


def check_input_size(size: int | Sequence[int], multiple: int = INPUT_MULTIPLE) -> tuple[int, int]:
    """(h, w) when both sides are multiples of `multiple` (stride 32 of P5, and the x2 upsamplings
    of the neck must meet the lateral maps exactly), else a one-line error naming a size that works."""
    h, w = (int(size), int(size)) if isinstance(size, int) else (int(size[-2]), int(size[-1]))
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        near = [max(multiple, round(s / multiple) * multiple) for s in (h, w)]
        hint = str(near[0]) if near[0] == near[1] else f"{near[0]}x{near[1]}"
        raise ValueError(f"input {h}x{w}: detection models need sides that are multiples of {multiple}, e.g. {hint}")
    return h, w


def _check_tensor(x: Any) -> None:
    """The input check of a forward pass, skipped while a tracer records the graph (a torch.fx
    Proxy is no tensor; TorchScript tracing and dynamo record shapes, not checks)."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
    if isinstance(x, torch.Tensor) and not torch.jit.is_tracing() and not compiling():
        check_input_size(x.shape[-2:])


def make_divisible(channels: float, divisor: int = 8) -> int:
    return int(math.ceil(channels / divisor) * divisor)


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + activation; padding keeps the size at stride 1."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, p: int | None = None, act: str = "silu"):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = ACTIVATIONS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 then 3x3 Conv; `x + f(x)` when `shortcut` and the channels match (`self.add`, fixed
    at construction, so tracing sees a plain add or none)."""

    def __init__(self, c_in: int, c_out: int, shortcut: bool = True, act: str = "silu"):
        super().__init__()
        self.cv1 = Conv(c_in, c_out, 1, act=act)
        self.cv2 = Conv(c_out, c_out, 3, act=act)
        self.add = bool(shortcut and c_in == c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block: cv1 and cv2 (1x1) to c_out / 2 each, n bottlenecks on cv1's branch, cv3 (1x1) on
    the concatenation of both branches."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True, act: str = "silu"):
        super().__init__()
        hidden = c_out // 2
        self.cv1 = Conv(c_in, hidden, 1, act=act)
        self.cv2 = Conv(c_in, hidden, 1, act=act)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, act=act) for _ in range(n)))
        self.cv3 = Conv(2 * hidden, c_out, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max pools (receptive fields 5, 9, 13)
    concatenated with their input."""

    def __init__(self, c_in: int, c_out: int, act: str = "silu"):
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden, 1, act=act)
        self.pool = nn.MaxPool2d(kernel_size=5, stride=1, padding=2)
        self.cv2 = Conv(4 * hidden, c_out, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat((x, y1, y2, self.pool(y2)), dim=1))


class Backbone(nn.Module):
    """CSP-Darknet: returns the stride 8, 16 and 32 features (C3 outputs at 8 and 16, SPPF at 32)."""

    def __init__(self, ch: Sequence[int], reps: Sequence[int], act: str):
        super().__init__()
        self.stem = Conv(3, ch[0], 6, 2, 2, act=act)
        for i in range(1, 5):
            setattr(self, f"down{i}", Conv(ch[i - 1], ch[i], 3, 2, act=act))
            setattr(self, f"c3_{i}", C3(ch[i], ch[i], reps[i - 1], shortcut=True, act=act))
        self.sppf = SPPF(ch[4], ch[4], act=act)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.c3_1(self.down1(self.stem(x)))
        p3 = self.c3_2(self.down2(x))
        p4 = self.c3_3(self.down3(p3))
        p5 = self.sppf(self.c3_4(self.down4(p4)))
        return p3, p4, p5


class PAN(nn.Module):
    """Top-down path (1x1 lateral conv, nearest x2, concat, C3) then bottom-up path (3x3 s2 conv,
    concat with the lateral conv of that level, C3); C3 blocks without shortcut adds."""

    def __init__(self, c3: int, c4: int, c5: int, n: int, act: str):
        super().__init__()
        self.lat5 = Conv(c5, c4, 1, act=act)
        self.up5 = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = C3(2 * c4, c4, n, shortcut=False, act=act)
        self.lat4 = Conv(c4, c3, 1, act=act)
        self.up4 = nn.Upsample(scale_factor=2, mode="nearest")
        self.out3 = C3(2 * c3, c3, n, shortcut=False, act=act)
        self.down3 = Conv(c3, c3, 3, 2, act=act)
        self.out4 = C3(2 * c3, c4, n, shortcut=False, act=act)
        self.down4 = Conv(c4, c4, 3, 2, act=act)
        self.out5 = C3(2 * c4, c5, n, shortcut=False, act=act)

    def forward(self, p3: torch.Tensor, p4: torch.Tensor, p5: torch.Tensor):
        l5 = self.lat5(p5)
        l4 = self.lat4(self.td4(torch.cat((self.up5(l5), p4), dim=1)))
        n3 = self.out3(torch.cat((self.up4(l4), p3), dim=1))
        n4 = self.out4(torch.cat((self.down3(n3), l4), dim=1))
        n5 = self.out5(torch.cat((self.down4(n4), l5), dim=1))
        return n3, n4, n5


def _anchor_tensor(anchors: Any) -> torch.Tensor:
    values = anchors if anchors is not None else DEFAULT_ANCHORS
    positive = bool((torch.as_tensor(values, dtype=torch.float32, device="cpu") > 0).all())  # also under a meta device
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.dim() != 3 or t.shape[0] != len(STRIDES) or t.shape[2] != 2 or t.shape[1] < 1 or not positive:
        raise ValueError(f"anchors must be 3 levels x A anchors x (w, h) positive pixels, got shape {tuple(t.shape)}")
    return t


class YOLODetector(nn.Module):
    """YOLOv5-v6-style detector; `forward(x)` returns the three raw level maps (see the module
    docstring). `anchors` (3, A, 2) in input pixels is a buffer, so it travels in the state dict."""

    def __init__(self, num_classes: int, width: float = 0.5, depth: float = 0.33, act: str = "silu",
                 anchors: Any = None, strides: Sequence[int] = STRIDES):
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be at least 1 for a detector")
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
        if tuple(int(s) for s in strides) != STRIDES:
            raise ValueError(f"this detector's levels have strides {STRIDES}, not {tuple(strides)}")
        self.num_classes, self.width, self.depth, self.act = int(num_classes), float(width), float(depth), act
        self.strides = STRIDES
        self.register_buffer("anchors", _anchor_tensor(anchors))
        self.num_anchors = int(self.anchors.shape[1])
        ch = [make_divisible(c * width) for c in (64, 128, 256, 512, 1024)]
        reps = [max(round(n * depth), 1) for n in (3, 6, 9, 3)]
        self.backbone = Backbone(ch, reps, act)
        self.neck = PAN(ch[2], ch[3], ch[4], reps[0], act)
        outputs = self.num_anchors * (5 + self.num_classes)
        self.detect = nn.ModuleList(nn.Conv2d(c, outputs, 1) for c in (ch[2], ch[3], ch[4]))
        self.init_detect_biases()

    @torch.no_grad()
    def init_detect_biases(self, image_size: int = 640) -> None:
        """Prior-probability biases: objectness log(8 / cells), classes log(0.6 / (C - 0.99))."""
        for conv, stride in zip(self.detect, self.strides):
            b = conv.bias.view(self.num_anchors, 5 + self.num_classes)
            b[:, 4] = math.log(8 / (image_size / stride) ** 2)
            b[:, 5:] = math.log(0.6 / (self.num_classes - 0.99))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _check_tensor(x)
        feats = self.neck(*self.backbone(x))
        return [conv(f) for conv, f in zip(self.detect, feats)]


def detect_layers(model: nn.Module) -> list[str]:
    """Names of the three detect convs; their INPUTS are the detection-layer feature maps L_FA
    measures. Works on a traced (torch.fx) copy too: the names survive tracing."""
    modules = dict(model.named_modules())
    missing = [n for n in DETECT_HEAD if not isinstance(modules.get(n), nn.Conv2d)]
    if missing:
        raise ValueError(f"{type(model).__name__} has no detect conv {', '.join(missing)}: not a YOLODetector")
    return list(DETECT_HEAD)


def _flatten_level(raw: torch.Tensor, num_anchors: int, per_anchor: int, h: int, w: int) -> torch.Tensor:
    """(N, A*(5+C), H, W) -> (N, A*H*W, 5+C), rows in (anchor, y, x) order. Every size is a Python
    int (never read from the tensor), so an export writes constant Reshape shapes."""
    rows = raw.reshape(-1, num_anchors, per_anchor, h, w).permute(0, 1, 3, 4, 2)
    return rows.reshape(-1, num_anchors * h * w, per_anchor)


def grid_constants(anchors: torch.Tensor, strides: Sequence[int],
                   sizes: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per flattened row (levels in order, then anchor, y, x): the cell (x, y) (1, T, 2), the stride
    (1, T, 1) and the anchor (w, h) (1, T, 2)."""
    grids, strides_t, anchors_t = [], [], []
    for level, ((h, w), stride) in enumerate(zip(sizes, strides)):
        a = anchors[level].to(torch.float32)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        cells = torch.stack((xs, ys), dim=-1).reshape(1, h * w, 2)
        grids.append(cells.expand(len(a), h * w, 2).reshape(-1, 2))
        strides_t.append(torch.full((len(a) * h * w, 1), float(stride)))
        anchors_t.append(a[:, None, :].expand(len(a), h * w, 2).reshape(-1, 2))
    return tuple(torch.cat(t)[None].to(anchors.device) for t in (grids, strides_t, anchors_t))


def decode_flat(flat: torch.Tensor, grid: torch.Tensor, stride: torch.Tensor,
                anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one decode formula, on raw rows (N, T, 5+C): xy = (2 p_xy - 0.5 + grid) * stride,
    wh = (2 p_wh)^2 * anchor, boxes xyxy, scores = p_obj * p_cls. Only elementwise ops, constant
    slices and one concat, so the export has no ScatterND."""
    p = torch.sigmoid(flat)
    xy = (p[..., 0:2] * 2 - 0.5 + grid) * stride
    wh = (p[..., 2:4] * 2) ** 2 * anchor
    half = wh * 0.5
    boxes = torch.cat((xy - half, xy + half), dim=-1)
    return boxes, p[..., 4:5] * p[..., 5:]


def decode(raw: Sequence[torch.Tensor], anchors: Any,
           strides: Sequence[int] = STRIDES) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw level maps -> (boxes (N, T, 4) xyxy in input pixels, scores (N, T, C)); T runs over
    level 0, 1, 2 and within a level over (anchor, y, x), row-major."""
    anchors = torch.as_tensor(anchors, dtype=torch.float32, device=raw[0].device)
    a = anchors.shape[1]
    sizes = [(int(r.shape[-2]), int(r.shape[-1])) for r in raw]
    flat = torch.cat([_flatten_level(r, a, int(r.shape[1]) // a, h, w) for r, (h, w) in zip(raw, sizes)], dim=1)
    grid, stride, anchor = (t.to(flat.dtype) for t in grid_constants(anchors, strides, sizes))
    return decode_flat(flat, grid, stride, anchor)


class DetectExport(nn.Module):
    """`model` followed by the decode, for a static `input_size`: returns (boxes (N, T, 4),
    scores (N, T, C)). Grids, strides and anchors are constant buffers and every reshape uses
    Python ints, so an opset-13 export holds no Shape, Range or ScatterND. A traced (torch.fx)
    copy keeps no `anchors` attribute: pass `anchors` (the model file's `anchors` argument)."""

    def __init__(self, model: nn.Module, input_size: int | Sequence[int], anchors: Any = None,
                 strides: Sequence[int] | None = None):
        super().__init__()
        anchors = anchors if anchors is not None else getattr(model, "anchors", None)
        if anchors is None:
            raise ValueError(f"{type(model).__name__} carries no anchors: pass DetectExport(..., anchors=...)")
        anchors = _anchor_tensor(torch.as_tensor(anchors).detach().cpu())
        strides = tuple(strides or getattr(model, "strides", STRIDES))
        h, w = check_input_size(input_size)
        self.model = model
        self.num_anchors = int(anchors.shape[1])
        self.sizes = [(h // s, w // s) for s in strides]
        self.per_anchor = [model.get_submodule(n).out_channels // self.num_anchors for n in detect_layers(model)]
        grid, stride, anchor = grid_constants(anchors, strides, self.sizes)
        self.register_buffer("grid", grid, persistent=False)
        self.register_buffer("stride", stride, persistent=False)
        self.register_buffer("anchor", anchor, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.model(x)
        flat = torch.cat([_flatten_level(r, self.num_anchors, c, h, w)
                          for r, c, (h, w) in zip(raw, self.per_anchor, self.sizes)], dim=1)
        return decode_flat(flat, self.grid, self.stride, self.anchor)


def yolo(width: float, depth: float):
    """The builder of a YOLODetector of this width and depth; `args`: act, anchors."""

    def build(num_classes: int, **args: Any) -> nn.Module:
        return YOLODetector(num_classes, width=width, depth=depth, **args)

    build.__doc__ = f"YOLOv5-v6-style detector, width {width}, depth {depth}: three raw level maps"
    return build


DETECTION_SPECS = tuple(
    ModelSpec(name, "detection", yolo(width, depth), head=DETECT_HEAD, outputs=("boxes", "scores"),
              input_size=DET_INPUT_SIZE, normalization={"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
              args={"act": "silu", "anchors": copy.deepcopy(DEFAULT_ANCHORS)})
    for name, width, depth in (("yolo_n", 0.25, 0.33), ("yolo_s", 0.50, 0.33))
)
for _spec in DETECTION_SPECS:
    register_model(_spec)
