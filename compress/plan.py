"""Which channels go: scores per pruning unit, then a selection that respects hardware shapes.

A *unit* is a set of channels that is kept or removed as one: a Torch-Pruning group (every
layer that reads or writes the same channels) under `--coupling shared`, or one branch of a
residual add under `--coupling reconstruct`. Selection is ours rather than Torch-Pruning's so
that rounding, minimums, per-layer caps and thresholds are applied in one place, the same way
for every criterion, and reported:

- the requested count comes from the ratio (the same fraction of every unit: RemoteTrimmer's
  per-layer quantile), from one global ranking (`--global`), or from a score threshold;
- kept counts are rounded *down* to a multiple of `round_to` (more pruning, never a slower
  odd width), but never below `min_channels` (rounded *up* to the multiple) nor below what
  `max_ratio` allows; a unit nobody asked to prune keeps its width even if it is not a multiple;
- a unit that is already narrower than its minimum is left alone and reported with a warning.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .importance import Criterion, is_filter_producer


@dataclass
class Unit:
    key: str
    group: int
    channels: int
    original: int
    scores: torch.Tensor | None
    producers: list[str]
    members: list[str]
    zero_rows: list[str]
    maps: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    consumers: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    residual: bool = False
    requested: int = 0
    requested_ratio: float = 0.0
    prune: list[int] = field(default_factory=list)
    note: str = ""
    warning: str = ""

    @property
    def kept(self) -> int:
        return self.channels - len(self.prune)


@dataclass
class Plan:
    model: nn.Module
    dg: Any
    groups: list[Any]
    units: list[Unit]
    names: dict[nn.Module, str]
    coupling: str
    structure: Any = None
    settings: dict[str, Any] = field(default_factory=dict)

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)


def _bn_after(dg, module: nn.Module) -> nn.BatchNorm2d | None:
    node = dg.module2node.get(module)
    if node is None:
        return None
    for out in node.outputs:
        if isinstance(out.module, nn.BatchNorm2d):
            return out.module
    return None


def _grouped(group) -> bool:
    for dep, _ in group:
        m = dep.layer
        if isinstance(m, nn.Conv2d) and 1 < m.groups and not (m.groups == m.in_channels == m.out_channels):
            return True
    return False


def build_units(
    model: nn.Module,
    example: torch.Tensor,
    criterion: Criterion,
    ignored: Sequence[nn.Module] = (),
    coupling: str = "shared",
    original: dict[str, int] | None = None,
) -> Plan:
    """Trace the model, score every unit. `original` gives the widths before an iterative
    schedule began, so ratios and caps stay relative to the unpruned model."""
    import torch_pruning as tp

    if coupling not in ("shared", "reconstruct"):
        raise ValueError(f"--coupling must be shared or reconstruct, not {coupling!r}")
    names = {m: n for n, m in model.named_modules()}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    ignored_all = [m for layer in ignored for m in layer.modules()]
    groups = list(dg.get_all_groups(ignored_layers=ignored_all, root_module_types=[nn.Conv2d, nn.Linear]))
    structure = None
    if coupling == "reconstruct":
        from .reconstruct import analyze

        structure = analyze(model, example, groups, names)
    units: list[Unit] = []
    with torch.no_grad():
        for gi, group in enumerate(groups):
            root = group[0].dep.layer
            n = len(group[0].idxs)
            out_layers = [dep.layer for dep, _ in group
                          if dg.is_out_channel_pruning_fn(dep.pruning_fn) and isinstance(dep.layer, nn.Module)]
            producers = [dep.layer for dep, _ in group if is_filter_producer(dep)]
            zero_rows = [names[p] for p in out_layers
                         if isinstance(p, (nn.Conv2d, nn.Linear)) and _bn_after(dg, p) is None]
            members = [names[m] for m in out_layers if m in names]
            maps = {names[dep.layer]: (list(item.idxs), list(item.root_idxs)) for item in group
                    for dep in (item.dep,) if dep.layer in names and dg.is_out_channel_pruning_fn(dep.pruning_fn)}
            consumers = {names[dep.layer]: (list(item.idxs), list(item.root_idxs)) for item in group
                         for dep in (item.dep,)
                         if dep.layer in names and dep.pruning_fn in (tp.prune_conv_in_channels,
                                                                      tp.prune_linear_in_channels)
                         and (not isinstance(dep.layer, nn.Conv2d) or dep.layer.groups == 1)}
            key = names.get(root, f"group{gi}")
            base = dict(group=gi, channels=n, original=(original or {}).get(key, n), zero_rows=zero_rows,
                        maps=maps, consumers=consumers)
            if _grouped(group):
                units.append(Unit(key=key, scores=None, producers=[names[p] for p in producers], members=members,
                                  note="grouped convolution: not pruned", **base))
                continue
            clusters = structure.clusters.get(gi) if structure is not None else None
            if clusters and len(clusters) > 1:
                for ci, cluster in enumerate(clusters):
                    cl_mods = [model.get_submodule(p) for p in cluster]
                    bns = [b for b in (_bn_after(dg, p) for p in cl_mods) if b is not None]
                    cl_members = [names[m] for m in cl_mods + bns]
                    scores = criterion.unit_scores(group, cl_mods + bns)
                    ukey = f"{key}#{ci}" if ci else key
                    units.append(Unit(key=ukey, scores=scores, producers=list(cluster), members=cl_members,
                                      residual=True, **{**base, "original": (original or {}).get(ukey, n),
                                                        "zero_rows": [z for z in zero_rows if z in cluster]}))
                continue
            scores = criterion.unit_scores(group)
            note = "" if scores is not None else "no score for this group under a threshold (no BatchNorm)"
            units.append(Unit(key=key, scores=scores, producers=[names[p] for p in producers], members=members,
                              note=note, **base))
    return Plan(model=model, dg=dg, groups=groups, units=units, names=names, coupling=coupling, structure=structure)


def _lower_bound(unit: Unit, min_channels: int, max_ratio: float, round_to: int) -> int:
    lb = max(int(min_channels), math.ceil(unit.original * (1 - max_ratio) - 1e-9), 1)
    if round_to > 1:
        lb = math.ceil(lb / round_to) * round_to
    return lb


def select(
    plan: Plan,
    ratio: float | None = None,
    threshold: float | None = None,
    global_ranking: bool = False,
    round_to: int | None = 8,
    min_channels: int = 8,
    max_ratio: float = 1.0,
) -> Plan:
    """Fill every unit's `prune` list. Exactly one of `ratio` and `threshold`."""
    if (ratio is None) == (threshold is None):
        raise ValueError("give either a pruning ratio or a threshold")
    if ratio is not None and not 0 <= ratio < 1:
        raise ValueError(f"--ratio must be between 0 and 1 (fraction of channels removed), not {ratio}")
    if not 0 < max_ratio <= 1:
        raise ValueError(f"--max-ratio must be in (0, 1], not {max_ratio}")
    if min_channels < 1:
        raise ValueError(f"--min-channels must be at least 1, not {min_channels}")
    rt = int(round_to) if round_to and round_to > 1 else 1
    scored = [u for u in plan.units if u.scores is not None]
    global_thr = None
    if ratio is not None and global_ranking and scored:
        allscores = torch.cat([u.scores for u in scored])
        total_now = sum(u.channels for u in scored)
        total_init = sum(u.original for u in scored)
        k = total_now - int(total_init * (1 - ratio))
        global_thr = torch.kthvalue(allscores, k).values.item() if k > 0 else None
    for u in plan.units:
        u.prune, u.requested, u.requested_ratio, u.warning = [], 0, 0.0, ""
        if u.scores is None:
            continue
        c = u.channels
        if threshold is not None:
            n_req = int((u.scores <= threshold).sum())
        elif global_ranking:
            n_req = int((u.scores <= global_thr).sum()) if global_thr is not None else 0
        else:
            n_req = max(c - int(u.original * (1 - ratio)), 0)
        u.requested = n_req
        u.requested_ratio = (ratio if ratio is not None and not global_ranking
                             else (u.original - c + n_req) / u.original)
        lb = _lower_bound(u, min_channels, max_ratio, rt)
        if n_req == 0:
            keep = c
        else:
            keep = c - n_req
            keep -= keep % rt
            keep = min(max(keep, lb), c)
        if keep < min_channels:
            u.warning = (f"{u.key} keeps {keep} channel(s), below --min-channels {min_channels}"
                         f" (it had {u.original})")
        order = torch.sort(u.scores, stable=True).indices
        u.prune = sorted(int(i) for i in order[: c - keep])
    if rt > 1:
        align_unions(plan, rt)
    plan.settings = {"ratio": ratio, "threshold": threshold, "global": global_ranking, "round_to": round_to,
                     "min_channels": min_channels, "max_ratio": max_ratio}
    return plan


def align_unions(plan: Plan, rt: int) -> None:
    """Under residual reconstruction an add outputs the union of its branches' channels, which
    its consumers read: keep that a multiple of `rt` too. At each add (in graph order) whose union
    is not, the branch that feeds it straight from its conv keeps `rt` more channels, its best
    pruned ones: `d` the union lacks and `rt - d` the union has already; the branch stays a
    multiple of `rt` and the union reaches the next multiple."""
    if plan.structure is None:
        return
    for gi, adds in plan.structure.adds.items():
        owner = {p: u for u in plan.units if u.residual and u.group == gi for p in u.producers}

        def kept(u: Unit) -> set[int]:
            return set(range(u.channels)) - set(u.prune)

        for _, ra, rb in adds:
            sides = [[owner[p] for p in r if p in owner] for r in (ra, rb)]
            union = set().union(*(kept(u) for side in sides for u in side))
            d = (rt - len(union) % rt) % rt
            if not d:
                continue
            fresh = [side[0] for side in sides if len({id(u) for u in side}) == 1]
            for u in sorted(fresh, key=lambda u: len(kept(u))):
                scores = u.scores if u.scores is not None else torch.zeros(u.channels)
                have = kept(u)
                outside = sorted((c for c in range(u.channels) if c not in union), key=lambda c: -float(scores[c]))
                inside = sorted((c for c in union if c not in have), key=lambda c: -float(scores[c]))
                if len(outside) >= d and len(inside) >= rt - d:
                    back = set(outside[:d] + inside[: rt - d])
                    u.prune = sorted(set(u.prune) - back)
                    break


def layer_table(plan: Plan, before: dict[str, int], after: dict[str, int]) -> list[dict[str, Any]]:
    """One row per conv/linear layer: widths before / after, requested vs achieved ratio."""
    requested: dict[str, float] = {}
    for u in plan.units:
        for p in u.producers + u.members:
            requested[p] = round(u.requested_ratio, 4)
    rows = []
    for name, c0 in before.items():
        c1 = after.get(name, c0)
        rows.append({"layer": name, "channels_before": c0, "channels_after": c1,
                     "requested_ratio": requested.get(name, 0.0), "achieved_ratio": round(1 - c1 / c0, 4)})
    return rows
