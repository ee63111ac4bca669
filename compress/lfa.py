"""L1RR's feature-attention loss (seed 001, eqs. 1-2) and the threshold search it drives.

FA(D) = 1/k sum_images sum(F * M): the activation of the feature map F inside the target region
M; L_FA = 1 - FA_pruned / FA_sparse. The paper reads F at each detection layer and M from the
boxes. A classifier has no detection layer: we read F at the deepest map at least `MIN_SIDE`
pixels wide (the input of the global pooling when it is that wide: 7x7 for ResNet18 at 224 px;
at EuroSAT's 64 px that map is 2x2, so layer2's 8x8 output), because a target region on a 2x2
grid says little about where the network looks; a segmentation model gives the map its
classifier conv reads. The task gives M
(`Task.target_regions`, any {0,1} map at F's size): for classification the class-activation
map of the *sparse* model for the image's label, thresholded at its mean (Grad-CAM weights make
this the classic CAM for a pooling + linear head and keep it defined for VGG's MLP head);
detection and segmentation give their boxes or masks.

Pruned models are evaluated as masked copies of the sparse model, which compute exactly what
the slimmed model would (see `compress.slim`), so a search costs forward passes, not slimming.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rsedge.trainer.modelfile import trace

_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d)
MIN_SIDE = 7  # a classifier's attention map: the deepest one at least this wide


def _head_names(gm, head: Sequence[str] | None) -> tuple[str, ...]:
    if head is None:
        from rsedge.trainer.models import model_spec

        spec = model_spec(gm)
        head = spec.head if spec is not None else ()
    return tuple(head)


def _head_input(gm, head: Sequence[str] | None):
    """The node a dense model's head reads: the input of its last declared head module (DeepLabV3+:
    the decoder's stride-4 map; LR-ASPP: its high-level branch), or None."""
    head = _head_names(gm, head)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in set(head)]
    calls = [n for n in calls if n.target == head[-1]] or calls
    return calls[0].args[0] if calls else None


def _every_head_input(gm, head: Sequence[str] | None) -> list:
    """The input of every declared head module, in the declared order (a detector's detection layers)."""
    head = _head_names(gm, head)
    if not head:
        raise ValueError("the model declares no head (a traced or reconstructed copy keeps no spec): pass head=, "
                         "the task's head modules, to read the detection layers")
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in set(head)}
    missing = [h for h in head if h not in calls]
    if missing:
        raise ValueError(f"the model's graph calls no head module {', '.join(missing)}: cannot read its feature maps")
    return [calls[h].args[0] for h in head]


def _wide_enough(gm, node, example: torch.Tensor, min_side: int):
    """`node`, or when its map is narrower than `min_side` the last node before it (in the
    graph's order) whose output is a 4-D map at least that wide."""
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(example)

    def side(n) -> int:
        meta = n.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        return min(shape[2], shape[3]) if shape is not None and len(shape) == 4 else 0

    if side(node) >= min_side:
        return node
    order = list(gm.graph.nodes)
    wide = [n for n in order[:order.index(node)] if n.op != "placeholder" and side(n) >= min_side]
    return wide[-1] if wide else node


def feature_model(model: nn.Module, copy: bool = True, head: Sequence[str] | None = None,
                  every_head: bool = False, example: torch.Tensor | None = None,
                  min_side: int = MIN_SIDE) -> nn.Module:
    """A traced `model` (a copy unless `copy=False`) whose output is (outputs, F), F the map
    before global pooling, or with `example` (an input batch, to read the shapes) the deepest
    map at least `min_side` wide; a model without global pooling (segmentation) gives the map its
    head reads (`head`: module names, default the model spec's); `every_head`: F is the list of
    the maps every head module reads (a detector's detection layers, eq. 2 of seed 001)."""
    import copy as _copy

    gm = trace(_copy.deepcopy(model) if copy else model)
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    if every_head:
        out.args = ((out.args[0], list(_every_head_input(gm, head))),)
        gm.recompile()
        return gm.eval()
    flat = next((n for n in graph.nodes if n.op == "call_function" and n.target is torch.flatten), None)
    node = flat.args[0] if flat is not None else _head_input(gm, head)
    if node is None:
        raise ValueError("no flatten and no declared head in the model's graph: cannot find the feature map "
                         "before the head")
    while flat is not None:
        pooled = (node.op == "call_module" and isinstance(gm.get_submodule(node.target), _POOLS)) or (
            node.op == "call_function" and node.target in (F.adaptive_avg_pool2d, F.avg_pool2d))
        if not pooled:
            break
        node = node.args[0]
    if flat is not None and example is not None:
        node = _wide_enough(gm, node, example, min_side)
    logits = out.args[0]
    out.args = ((logits, node),)
    gm.recompile()
    return gm.eval()


@torch.no_grad()
def feature_attention(fm: nn.Module, images: torch.Tensor, masks: Any, batch: int = 32) -> float | list[float]:
    """Eq. 1: FA = 1/k sum over images of sum(F * M). With F a list of maps (`every_head`) and
    `masks` a list of masks at their sizes, one FA per map."""
    totals: list[float] | None = None
    for i in range(0, len(images), batch):
        _, feats = fm(images[i:i + batch])
        single = torch.is_tensor(feats)
        feats, level_masks = ([feats], [masks]) if single else (list(feats), list(masks))
        sums = [float((f * m[i:i + batch, None]).sum()) for f, m in zip(feats, level_masks)]
        totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
    k = max(len(images), 1)
    values = [t / k for t in (totals or [0.0])]
    return values[0] if torch.is_tensor(masks) else values


def lfa(fa_pruned: float | Sequence[float], fa_sparse: float | Sequence[float]) -> float:
    """Eq. 2: 1 - FA_pruned / FA_sparse, averaged over the detection layers when given per layer."""
    pruned = [fa_pruned] if isinstance(fa_pruned, (int, float)) else list(fa_pruned)
    sparse = [fa_sparse] if isinstance(fa_sparse, (int, float)) else list(fa_sparse)
    if len(pruned) != len(sparse):
        raise ValueError(f"L_FA compares {len(pruned)} feature map(s) of the pruned model with {len(sparse)} of the "
                         f"sparse one")
    if any(s == 0 for s in sparse):
        raise ValueError("the sparse model has no activation inside the target regions (FA = 0)")
    return sum(1.0 - p / s for p, s in zip(pruned, sparse)) / len(sparse)


def search_threshold(
    scores: torch.Tensor,
    evaluate: Callable[[float], tuple[float, float]],
    target: float,
    grid: int = 19,
    refine: int = 8,
    log: Callable[[str], None] = print,
    tolerance: float = 0.0,
) -> tuple[float | None, list[dict[str, Any]]]:
    """The largest threshold whose L_FA stays within `target` on either side, give or take
    `tolerance` (relative): |L_FA| <= target * (1 + tolerance). Two-sided, because a pruned model
    that attends much MORE to the targets than the sparse one has changed as much as one that
    attends less (SiLU maps make such swings real); a tolerance, because the paper accepts
    "around 1 %" (its chosen point: 1.14 %). `evaluate(delta)` returns
    (L_FA, fraction of channels pruned). A coarse grid of score quantiles first, then bisection
    over the distinct scores between the last passing and the first failing grid point (L_FA is
    not strictly monotone once rounding to multiples of 8 steps in)."""
    values = torch.unique(scores.float())
    limit = target * (1 + tolerance)
    curve: list[dict[str, Any]] = []
    seen: dict[float, tuple[float, float]] = {}

    def run(delta: float) -> float:
        if delta not in seen:
            seen[delta] = evaluate(delta)
            loss, frac = seen[delta]
            curve.append({"threshold": delta, "lfa": loss, "pruned_fraction": frac})
            log(f"  threshold {delta:.6g}: pruned {frac:.1%} of the channels, L_FA {loss:.4%}")
        return seen[delta][0]

    qs = torch.linspace(0, 1, grid + 2)[1:-1]
    points = sorted({float(torch.quantile(values, q)) for q in qs})
    best = None
    for d in points:
        if abs(run(d)) <= limit:
            best = d
    above = [d for d in points if best is None or d > best]
    first_fail = above[0] if above else None
    cand = [float(v) for v in values
            if (best is None or float(v) > best) and (first_fail is None or float(v) < first_fail)]
    lo, hi = 0, len(cand) - 1
    for _ in range(refine):
        if lo > hi:
            break
        mid = (lo + hi) // 2
        if abs(run(cand[mid])) <= limit:
            best, lo = cand[mid], mid + 1
        else:
            hi = mid - 1
    curve.sort(key=lambda r: r["threshold"])
    return best, curve
