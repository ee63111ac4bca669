"""Segmentation architectures of the registry: DeepLabV3+ (seed 002) and LR-ASPP, the light edge model.

DeepLabV3+ comes from segmentation_models_pytorch (output stride 16, ASPP rates 6/12/18 as in
Chen et al. 2018, where smp's default is 12/24/36; low-level skip from the stride-4 features),
rebuilt as a plain module holding smp's own encoder, decoder and head, under smp's parameter
names so an smp checkpoint loads. Plain, because smp's `forward` checks the input size with
Python arithmetic on the shape, which torch.fx (residual reconstruction) cannot trace; ours checks
it with our one-line error, outside of tracing. smp's ASPP pooling branch reads the input shape,
which the TorchScript exporter writes as a Shape chain that simplification folds away at a static
input size; the tests count the ops of the simplified graph.

LR-ASPP (Howard et al. 2019) is torchvision's, whose forward returns a dict: ours returns the
logits tensor and keeps torchvision's parameter names. Both classifier convs are its head.

Weights never come from the network (smp's `encoder_weights` and torchvision's `weights` and
`weights_backbone` are always None): initial weights only through `create_model(weights=FILE)`.
Every model outputs logits (N, classes, H, W) at the input resolution; input sides must be
multiples of `INPUT_MULTIPLE` (`check_input_size`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .models import ModelSpec, register_model

INPUT_MULTIPLE = 32
SEG_INPUT_SIZE = (256, 256)
ATROUS_RATES = (6, 12, 18)


def check_input_size(size: Sequence[int], multiple: int = INPUT_MULTIPLE) -> tuple[int, int]:
    """(h, w) when both are multiples of `multiple` (output stride 16 and the stride-4 skip must
    line up), else the one-line error that names the nearest size that works."""
    h, w = (int(size), int(size)) if isinstance(size, int) else (int(size[-2]), int(size[-1]))
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        near = [max(multiple, round(s / multiple) * multiple) for s in (h, w)]
        hint = str(near[0]) if near[0] == near[1] else f"{near[0]}x{near[1]}"
        raise ValueError(f"input {h}x{w}: segmentation models need sides that are multiples of {multiple}, "
                         f"e.g. {hint}")
    return h, w


def _check_tensor(x: Any) -> None:
    """The input check of a forward pass, skipped while a tracer or compiler records the graph
    (a torch.fx Proxy is no tensor; TorchScript tracing and dynamo record shapes, not checks)."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)  # torch >= 2.3
    if isinstance(x, torch.Tensor) and not torch.jit.is_tracing() and not compiling():
        check_input_size(x.shape[-2:])


def _min_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError("num_classes must be at least 2 (a segmentation model's classes include the background)")


class DeepLabV3Plus(nn.Module):
    """smp's DeepLabV3+ (encoder, decoder, segmentation head, under smp's names) returning logits."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, segmentation_head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.segmentation_head = segmentation_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tensor(x)
        return self.segmentation_head(self.decoder(self.encoder(x)))


def deeplabv3plus(encoder_name: str):
    """The builder of DeepLabV3+ on `encoder_name`; `args` go to smp's constructor
    (`encoder_output_stride`, `decoder_atrous_rates`, `decoder_channels`...), never weights."""

    def build(num_classes: int, **args: Any) -> nn.Module:
        import segmentation_models_pytorch as smp

        _min_classes(num_classes)
        if args.get("encoder_weights") is not None:
            raise ValueError("rsedge never downloads weights: give initial weights as a local file (--weights FILE)")
        args = {"encoder_output_stride": 16, "decoder_atrous_rates": ATROUS_RATES, **args, "encoder_weights": None}
        args["decoder_atrous_rates"] = tuple(args["decoder_atrous_rates"])
        net = smp.DeepLabV3Plus(encoder_name, classes=num_classes, **args)
        return DeepLabV3Plus(net.encoder, net.decoder, net.segmentation_head)

    build.__doc__ = f"segmentation_models_pytorch DeepLabV3+ on {encoder_name}, logits at the input resolution"
    return build


class LRASPPLogits(nn.Module):
    """torchvision's LR-ASPP (backbone, classifier, under torchvision's names) returning logits."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tensor(x)
        out = self.classifier(self.backbone(x))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def lraspp_mobilenet_v3_large(num_classes: int, **args: Any) -> nn.Module:
    """torchvision `lraspp_mobilenet_v3_large` (dilated MobileNetV3-Large, output stride 16), no
    weights, logits at the input resolution; `args` go to torchvision (`inter_channels`)."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large as tv_lraspp

    _min_classes(num_classes)
    if args.get("weights") is not None or args.get("weights_backbone") is not None:
        raise ValueError("rsedge never downloads weights: give initial weights as a local file (--weights FILE)")
    args = {**args, "weights": None, "weights_backbone": None}
    net = tv_lraspp(num_classes=num_classes, **args)
    return LRASPPLogits(net.backbone, net.classifier)


DEEPLAB_HEAD = ("segmentation_head.0",)
LRASPP_HEAD = ("classifier.low_classifier", "classifier.high_classifier")
_DEEPLAB_ARGS = {"encoder_output_stride": 16, "decoder_atrous_rates": list(ATROUS_RATES)}

SEGMENTATION_SPECS = (
    ModelSpec("deeplabv3plus_resnet18", "segmentation", deeplabv3plus("resnet18"), head=DEEPLAB_HEAD,
              input_size=SEG_INPUT_SIZE, args=dict(_DEEPLAB_ARGS)),
    ModelSpec("deeplabv3plus_resnet50", "segmentation", deeplabv3plus("resnet50"), head=DEEPLAB_HEAD,
              input_size=SEG_INPUT_SIZE, args=dict(_DEEPLAB_ARGS)),
    ModelSpec("lraspp_mobilenet_v3_large", "segmentation", lraspp_mobilenet_v3_large, head=LRASPP_HEAD,
              input_size=SEG_INPUT_SIZE),
)
for _spec in SEGMENTATION_SPECS:
    register_model(_spec)


def input_multiple(arch: str) -> int:
    """What every input side of `arch` must be a multiple of (1: any size)."""
    return INPUT_MULTIPLE if any(s.name == arch for s in SEGMENTATION_SPECS) else 1
