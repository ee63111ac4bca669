"""Carry a plan out: physical slimming, the equivalent masked model, and bias compensation.

The *masked* model is the unpruned model with the pruned channels silenced at their source (the
BatchNorm's scale and shift set to zero, or the filter and bias of a producer that has no
BatchNorm after it): those channels then output exactly zero. The slimmed model must compute
the same function; the tests check it to 1e-4 for both coupling modes, and the feature-attention
search evaluates candidate thresholds on masked copies instead of slimming each one.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .plan import Plan, Unit, _bn_after


def _own(unit: Unit, name: str, which: str = "maps") -> list[int]:
    own, root = getattr(unit, which).get(name, (None, None))
    if own is None:
        return list(unit.prune)
    pruned = set(unit.prune)
    return [o for o, r in zip(own, root) if r in pruned]


@torch.no_grad()
def mask_model(model: nn.Module, plan: Plan, shift: bool = True) -> nn.Module:
    """Silence the pruned channels of `model` (a model with the plan's layer names) in place.
    `shift=False` keeps the BatchNorm shifts: then a pruned channel emits a constant, which is
    what `--compensate` measures and folds."""
    for u in plan.units:
        if not u.prune:
            continue
        for name in u.members:
            m = model.get_submodule(name)
            if isinstance(m, nn.BatchNorm2d):
                idx = torch.as_tensor(_own(u, name), dtype=torch.long)
                m.weight[idx] = 0
                if shift:
                    m.bias[idx] = 0
        for name in u.zero_rows:
            m = model.get_submodule(name)
            idx = torch.as_tensor(_own(u, name), dtype=torch.long)
            m.weight[idx] = 0
            if shift and m.bias is not None:
                m.bias[idx] = 0
    return model


def masked_copy(model: nn.Module, plan: Plan, shift: bool = True) -> nn.Module:
    return mask_model(copy.deepcopy(model), plan, shift)


def apply_plan(plan: Plan) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Slim `plan.model`: shared units through Torch-Pruning's groups (in place), residual
    branches through the reconstruction rewrite (returns a traced model)."""
    model = plan.model
    for u in plan.units:
        if u.residual or not u.prune:
            continue
        root = plan.groups[u.group][0].dep
        group = plan.dg.get_pruning_group(root.target.module, root.handler, u.prune)
        if plan.dg.check_pruning_group(group):
            group.prune()
        else:
            u.note = "Torch-Pruning refused: it would empty a layer"
            u.prune = []
    residual = [u for u in plan.units if u.residual]
    if not residual:
        return model, []
    from .reconstruct import apply

    kept: dict[str, list[int]] = {}
    for u in residual:
        keep = sorted(set(range(u.channels)) - set(u.prune))
        for p in u.producers:
            kept[p] = keep
    return apply(model, kept, plan.structure)


def _spatial_sum(w: torch.Tensor) -> torch.Tensor:
    return w.sum(tuple(range(2, w.ndim))) if w.ndim > 2 else w


@torch.no_grad()
def compensate(plan: Plan, inputs: torch.Tensor, batch: int = 32) -> dict[str, Any]:
    """Fold the constant that each removed channel still feeds its consumers into the consumer's
    bias (or into the running mean of the BatchNorm after it, which is the same thing and needs no
    new parameter). The constant is measured on the model with the pruned channels' BatchNorm
    scale set to zero (shift kept): exact for 1x1 consumers, approximate at the borders of padded
    kxk convolutions, where the padding sees zeros instead. Must run before `apply_plan`."""
    model = plan.model
    ref = masked_copy(model, plan, shift=False).eval()
    ref_modules = dict(ref.named_modules())
    todo: dict[str, list[int]] = {}
    skipped = 0
    for u in plan.units:
        if not u.prune:
            continue
        if u.residual:
            skipped += len(u.prune)
            continue
        for name in u.consumers:
            todo[name] = _own(u, name, "consumers")
    sums: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def fn(mod, args, out):
            x = args[0].detach().double()
            dims = [0] + list(range(2, x.ndim))
            idx = torch.as_tensor(todo[name], dtype=torch.long, device=x.device)
            sel = x.index_select(1, idx)
            acc = sums.setdefault(name, [torch.zeros(len(idx), dtype=torch.float64)] * 2 + [0])
            n = sel.numel() // max(len(idx), 1)
            sums[name] = [acc[0] + sel.sum(dims).cpu(), acc[1] + sel.pow(2).sum(dims).cpu(), acc[2] + n]
        return fn

    handles = [ref_modules[n].register_forward_hook(hook(n)) for n in todo if todo[n]]
    try:
        device = next(ref.parameters()).device
        for i in range(0, len(inputs), batch):
            ref(inputs[i:i + batch].to(device))
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, idx in todo.items():
        if not idx or name not in sums:
            continue
        s1, s2, n = sums[name]
        mean = s1 / n
        std = (s2 / n - mean.pow(2)).clamp(min=0).sqrt()
        m = model.get_submodule(name)
        w = m.weight.detach().double().cpu().index_select(1, torch.as_tensor(idx, dtype=torch.long))
        k = (_spatial_sum(w) * mean).sum(1).to(m.weight.dtype)
        bn = _bn_after(plan.dg, m)
        if bn is not None:
            bn.running_mean.sub_(k.to(bn.running_mean.device))
            where = "running mean of the following BatchNorm"
        elif m.bias is not None:
            m.bias.add_(k.to(m.bias.device))
            where = "bias"
        else:
            m.bias = nn.Parameter(k.to(m.weight.device))
            where = "new bias"
        padded = isinstance(m, nn.Conv2d) and any(kk > 1 for kk in m.kernel_size) and any(
            p > 0 for p in (m.padding if isinstance(m.padding, tuple) else (1,)))
        rows.append({"consumer": name, "channels": len(idx), "folded_abs_mean": float(mean.abs().sum()),
                     "dropped_std": float(std.sum()), "into": where, "exact": not padded,
                     "note": "approximate at the borders (padded kxk)" if padded else "exact"})
    return {
        "consumers": rows,
        "folded": float(sum(r["folded_abs_mean"] for r in rows)),
        "dropped": float(sum(r["dropped_std"] for r in rows)),
        "not_folded_residual_channels": skipped,
        "samples": int(len(inputs)),
    }


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
