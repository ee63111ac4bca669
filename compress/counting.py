"""Parameters and multiply-accumulates, counted by forward hooks on the layers that do the work.

Kept in our own code (not a profiler) because pruning reports are judged by these numbers and the
rule is simple and checkable: a conv costs out_elements * in_channels/groups * kh * kw MACs, a
linear layer in * out per row; normalization, activations and pooling are not counted (the
convention of the pruning papers we compare with).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int], channels: int = 3) -> int:
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, channels, *input_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)


def architecture_counts(arch: str, num_classes: int, input_size: Sequence[int]) -> dict[str, int]:
    """Parameters and MACs of an unpruned registry architecture, built on the meta device: shapes
    only, no memory and no arithmetic, so even vgg16_bn at 224 px costs a fraction of a second."""
    from rsedge.trainer.models import create_model

    with torch.device("meta"):
        model = create_model(arch, num_classes)
    return {"params": count_params(model), "macs": count_macs(model, input_size)}
