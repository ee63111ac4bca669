"""Channel importance criteria, written as Torch-Pruning importance objects.

Torch-Pruning gives us the dependency graph (which layers must lose the same channels); the
scores are our own, because they are what the papers define and what our tests check against a
direct computation. A criterion receives a *group* of coupled layers and returns one score per
channel of the group's root; when several layers in the group carry a score (e.g. the convs
that feed one residual add), each layer's scores are divided by their mean before averaging, so
a layer with large weights does not decide alone.

Each criterion also exposes `layer_scores(group)` (the per-layer scores before they are
combined) so that residual reconstruction can rank every branch of an add on its own, and
threshold criteria (`bn-scale`, `l1rr`) combine *raw* |gamma| by the maximum over the coupled
BatchNorms: a shared channel can only go when every layer that writes it is below the threshold.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch_pruning import importance as tp_importance
from torch_pruning.pruner import function as tp_fn

LayerScore = tuple[nn.Module, torch.Tensor, list[int]]

_OUT_FNS = (tp_fn.prune_conv_out_channels, tp_fn.prune_linear_out_channels)


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


def _combine_max(n: int, per_layer: list[tuple[torch.Tensor, list[int]]]) -> torch.Tensor:
    out = torch.full((n,), -1.0, dtype=torch.float64)
    for scores, root_idxs in per_layer:
        idx = torch.as_tensor(root_idxs, dtype=torch.long)
        cur = out.index_select(0, idx)
        out.index_copy_(0, idx, torch.maximum(cur, scores.detach().double().cpu()))
    return out.clamp(min=0).float()


def is_filter_producer(dep) -> bool:
    """A regular conv or linear layer whose output channels this group removes (depthwise convs
    only follow their input: they produce no channel of their own)."""
    return dep.pruning_fn in _OUT_FNS and isinstance(dep.layer, (nn.Conv2d, nn.Linear))


def _is_bn_dep(dep) -> bool:
    layer = dep.layer
    return dep.pruning_fn == tp_fn.prune_batchnorm_out_channels and isinstance(layer, nn.BatchNorm2d) and layer.affine


class Criterion(tp_importance.Importance):
    """Per-layer scores, combined over a group. `raw` switches to the threshold semantics
    (maximum of unnormalized scores); only criteria with `threshold_ok` support it."""

    name = "?"
    needs_data = False
    threshold_ok = False

    def __init__(self) -> None:
        self.raw = False

    def layer_scores(self, group) -> list[LayerScore]:
        raise NotImplementedError

    def fallback(self, group) -> list[LayerScore]:
        return []

    def combine(self, group, entries: list[LayerScore]) -> torch.Tensor | None:
        if not entries:
            return None
        pairs = [(s, r) for _, s, r in entries]
        if self.raw:
            return _combine_max(len(group[0].idxs), pairs)
        return _combine(group, pairs)

    def unit_scores(self, group, members: Iterable[nn.Module] | None = None) -> torch.Tensor | None:
        """Scores of the group, or of the part of it that `members` (producers and their
        BatchNorms) write: one branch of a residual add under residual reconstruction."""
        entries = self.layer_scores(group)
        if not entries and not self.raw:
            entries = self.fallback(group)
        if members is not None:
            keep = set(map(id, members))
            entries = [e for e in entries if id(e[0]) in keep]
        return self.combine(group, entries)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        scores = self.unit_scores(group)
        return torch.ones(len(group[0].idxs)) if scores is None else scores


class FilterL1(Criterion):
    """L1 norm of each output filter (Li et al., "Pruning Filters for Efficient ConvNets")."""

    name = "l1"

    @torch.no_grad()
    def layer_scores(self, group) -> list[LayerScore]:
        out = []
        for i, (dep, idxs) in enumerate(group):
            if is_filter_producer(dep):
                w = dep.layer.weight.detach()[idxs].flatten(1)
                out.append((dep.layer, w.abs().sum(1), group[i].root_idxs))
        return out


class BNScale(Criterion):
    """|gamma| of the BatchNorm after each conv (Liu et al., "Network Slimming"). A group with no
    BatchNorm (a squeeze-excitation conv, a hidden linear layer) falls back to filter L1 rather
    than to an arbitrary order; under a threshold it is not pruned (there is no gamma to read)."""

    name = "bn-scale"
    threshold_ok = True

    @torch.no_grad()
    def layer_scores(self, group) -> list[LayerScore]:
        out = []
        for i, (dep, idxs) in enumerate(group):
            if _is_bn_dep(dep):
                out.append((dep.layer, dep.layer.weight.detach()[idxs].abs(), group[i].root_idxs))
        return out

    def fallback(self, group) -> list[LayerScore]:
        return FilterL1().layer_scores(group)


class L1RRScale(BNScale):
    """L1RR (seed 001): |gamma| after the dynamic, self-adaptive reweighted-L1 sparse training,
    cut by one global threshold delta (chosen directly or by the feature-attention loss)."""

    name = "l1rr"


class RandomScores(Criterion):
    """Uniform random scores: the control every criterion must beat. Seeded, so a run repeats."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def layer_scores(self, group) -> list[LayerScore]:
        n = len(group[0].idxs)
        root = group[0].dep.layer
        return [(root, torch.rand(n, generator=self.generator), list(range(n)))]

    def unit_scores(self, group, members=None) -> torch.Tensor | None:
        return torch.rand(len(group[0].idxs), generator=self.generator)


class FPGM(Criterion):
    """Filter Pruning via Geometric Median (He et al., CVPR 2019): a filter close to all the
    others (small sum of L2 distances, i.e. near the layer's geometric median) is the most
    replaceable. Raw filter weights, as in the paper."""

    name = "fpgm"

    @torch.no_grad()
    def layer_scores(self, group) -> list[LayerScore]:
        out = []
        for i, (dep, idxs) in enumerate(group):
            if is_filter_producer(dep):
                w = dep.layer.weight.detach()[idxs].flatten(1).double()
                out.append((dep.layer, torch.cdist(w, w, p=2).sum(1).float(), group[i].root_idxs))
        return out


class _Precomputed(Criterion):
    """Scores measured beforehand (on data) and looked up per layer; layers without a score,
    e.g. ones the measurement never reached, fall back to filter L1."""

    needs_data = True
    scores: dict[nn.Module, torch.Tensor]

    def owns(self, dep) -> bool:
        raise NotImplementedError

    def layer_scores(self, group) -> list[LayerScore]:
        out = []
        for i, (dep, idxs) in enumerate(group):
            if self.owns(dep) and dep.layer in self.scores:
                out.append((dep.layer, self.scores[dep.layer][idxs], group[i].root_idxs))
        return out

    def fallback(self, group) -> list[LayerScore]:
        return FilterL1().layer_scores(group)


class Taylor(_Precomputed):
    """First-order Taylor importance (seed 002): Phi(W) = |mean over the filter of dL/dw * w|,
    read from `scores` that `compress.taylor.taylor_scores` accumulated over training batches."""

    name = "taylor"

    def __init__(self, scores: dict[nn.Module, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.scores = scores or {}

    def owns(self, dep) -> bool:
        return is_filter_producer(dep)


class ChannelAttention(_Precomputed):
    """RemoteTrimmer's Channel Attention Pruning (seed 000): I = s_bar * |gamma|, with s_bar the
    mean sigmoid output of a squeeze-and-excitation probe trained after the BatchNorm
    (`compress.cap.channel_attention`). |gamma| rather than gamma: a negative scale carries as
    much signal as a positive one. Scores are fixed when the criterion is made, before any
    folding of the attention into the BatchNorm."""

    name = "cap"

    def __init__(self, s_bar: dict[nn.Module, torch.Tensor] | None = None) -> None:
        super().__init__()
        with torch.no_grad():
            self.scores = {bn: s.detach().float().cpu() * bn.weight.detach().abs().float().cpu()
                           for bn, s in (s_bar or {}).items()}

    def owns(self, dep) -> bool:
        return _is_bn_dep(dep)


class GroupMagnitude(Criterion):
    """Torch-Pruning's default group importance, the "DepGraph" row of RemoteTrimmer's table
    (Fang et al., CVPR 2023): per channel, the squared L2 norm of every parameter slice the group
    removes (output filters, input columns of the consumers, BatchNorm scales), averaged over the
    layers and divided by its mean. Computed by Torch-Pruning, checked by our tests."""

    name = "group"

    def __init__(self) -> None:
        super().__init__()
        self.tp = tp_importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")

    @torch.no_grad()
    def layer_scores(self, group) -> list[LayerScore]:
        out = []
        for i, (dep, idxs) in enumerate(group):
            if is_filter_producer(dep):
                w = dep.layer.weight.detach()[idxs].flatten(1)
                out.append((dep.layer, w.pow(2).sum(1), group[i].root_idxs))
            elif _is_bn_dep(dep):
                out.append((dep.layer, dep.layer.weight.detach()[idxs].pow(2), group[i].root_idxs))
        return out

    def combine(self, group, entries: list[LayerScore]) -> torch.Tensor | None:
        if not entries:
            return None
        n = len(group[0].idxs)
        total = torch.zeros(n, dtype=torch.float64)
        for _, s, r in entries:
            total.index_add_(0, torch.as_tensor(r, dtype=torch.long), s.double().cpu())
        total /= len(entries)
        return (total / total.mean()).float() if total.mean() > 0 else total.float()

    @torch.no_grad()
    def unit_scores(self, group, members=None) -> torch.Tensor | None:
        if members is not None:
            return super().unit_scores(group, members)
        scores = self.tp(group)
        return None if scores is None else scores.detach().float().cpu()


CRITERIA: dict[str, type[Criterion]] = {
    c.name: c for c in (RandomScores, FilterL1, BNScale, FPGM, Taylor, ChannelAttention, GroupMagnitude, L1RRScale)
}


def get_criterion(name: str, **kwargs) -> Criterion:
    if name not in CRITERIA:
        raise KeyError(f"unknown pruning method {name!r}; known: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name](**kwargs)
