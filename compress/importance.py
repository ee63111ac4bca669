"""Channel importance criteria, written as Torch-Pruning importance objects.

Torch-Pruning gives us the dependency graph (which layers must lose the same channels); the
scores are our own, because they are what the papers define and what our tests check against a
direct computation. A criterion receives a *group* of coupled layers and returns one score per
channel of the group's root; when several layers in the group carry a score (e.g. the convs
that feed one residual add), each layer's scores are divided by their mean before averaging, so
a layer with large weights does not decide alone.
"""
from __future__ import annotations

import torch
from torch import nn
from torch_pruning import importance as tp_importance
from torch_pruning.pruner import function as tp_fn


def _combine(group, per_layer: list[tuple[torch.Tensor, list[int]]]) -> torch.Tensor:
    n = len(group[0].idxs)
    if not per_layer:
        return torch.ones(n)
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    for scores, root_idxs in per_layer:
        scores = scores.detach().double().cpu()
        mean = scores.mean()
        scores = scores / mean if mean > 0 else scores
        idx = torch.as_tensor(root_idxs, dtype=torch.long)
        total.index_add_(0, idx, scores)
        count.index_add_(0, idx, torch.ones_like(scores))
    return (total / count.clamp(min=1)).float()


class FilterL1(tp_importance.Importance):
    """L1 norm of each output filter (Li et al., "Pruning Filters for Efficient ConvNets")."""

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        per_layer = []
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.layer, dep.pruning_fn
            if fn in (tp_fn.prune_conv_out_channels, tp_fn.prune_linear_out_channels) and isinstance(
                layer, (nn.Conv2d, nn.Linear)
            ):
                w = layer.weight.detach()[idxs].flatten(1)
                per_layer.append((w.abs().sum(1), group[i].root_idxs))
        return _combine(group, per_layer)


class BNScale(tp_importance.Importance):
    """|gamma| of the BatchNorm after each conv (Liu et al., "Network Slimming"). A group with no
    BatchNorm (a squeeze-excitation conv, a hidden linear layer) falls back to filter L1 rather
    than to an arbitrary order."""

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        per_layer = []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            is_bn = isinstance(layer, nn.BatchNorm2d) and layer.affine
            if dep.pruning_fn == tp_fn.prune_batchnorm_out_channels and is_bn:
                per_layer.append((layer.weight.detach()[idxs].abs(), group[i].root_idxs))
        if not per_layer:
            return FilterL1()(group)
        return _combine(group, per_layer)


CRITERIA = {"l1": FilterL1, "bn-scale": BNScale}


def get_criterion(name: str) -> tp_importance.Importance:
    if name not in CRITERIA:
        raise KeyError(f"unknown pruning method {name!r}; known: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]()
