"""Unstructured weight pruning: masks that zero single weights, for a pack that sends fewer bytes
(compress/ptq.py stores only the kept codes plus a bitmap) and, with the 2:4 pattern, for
TensorRT's sparse tensor cores. Nothing is removed from the graph: a pruned weight is a zero.

Which weights: the `weight` of every Conv1d/2d/3d and Linear module, named as in the state dict
(`features.0.weight`): the tensors that hold nearly all of a classifier's bytes. Biases,
BatchNorm / LayerNorm and layer scales stay dense (few bytes, large effect). The classifier's head
(the modules the model's spec declares; never guessed from sizes) is *included* by default: the
target is a fraction of all prunable weights, so leaving the head out would silently push its
share onto the other layers, and LAP already spares it when it is sensitive.
`LayerSelection(include_head=False)` keeps it dense; `exclude` takes fnmatch patterns.

Methods (`PruneOptions.method`):

- `fixed`: one global magnitude threshold. Exactly round(sparsity * N) weights with the smallest
  |w| over all N prunable weights are zeroed (Han et al., 2015), ties broken by position.
- `lap` (layer-adaptive pruning, after Shinde, "Adaptive quantization and pruning of deep neural
  networks via layer importance estimation", NeurIPS 2024 Compression Workshop, the method the
  seed paper cites; that paper ranks layers by a statistical importance). Our definition:
  1. importance I_l of each layer, one of
     - `loss`: the increase of the calibration loss when layer l alone is pruned (by magnitude)
       at `probe_sparsity`, the others untouched; clamped at 0. The loss is the given loss_fn
       on (inputs, targets) batches, or, without one, the relative output distortion
       sum ||f'(x) - f(x)||^2 / sum ||f(x)||^2 against the unpruned model (no labels needed).
     - `weights` (data-free): the fraction of the layer's energy ||W||^2 that pruning it at
       `probe_sparsity` removes. Scale-free, so a conv followed by BatchNorm is judged by the
       shape of its weight distribution, not its arbitrary scale.
  2. normalized importance r_l = I_l / mean_l(I_l) (0 when every I_l is 0).
  3. sparsity s_l = min(max_layer_sparsity, a / (1 + r_l)): inversely related to importance, a
     layer of average importance gets half the sparsity of a layer of none; `a` is found by
     bisection so that sum_l n_l s_l = sparsity * N, and the counts are rounded (largest
     remainder) so exactly round(sparsity * N) weights go, as with `fixed`.
  Within each layer the smallest |w| go.
- `pattern="2:4"`: TensorRT's structured sparsity (Developer Guide, "Sparsity"): for each output
  channel and each spatial position of the kernel, every four consecutive *input channels* hold
  at least two zeros, i.e. groups W[k, 4c:4c+4, r, s] of a [K, C, R, S] weight ([K, C] for a
  Linear), which needs C % 4 == 0. In every group the two smallest |w| go; layers whose C (per
  group, for grouped convs) is not a multiple of 4 stay dense and are listed in the result. The
  sparsity is then 50 % of the eligible layers; `sparsity` and `method` are not used.

`apply_masks` zeroes the weights in place; `keep_masks` re-applies the masks after every optimizer
step, so fine-tuning (with momentum, weight decay, Adam) cannot revive a pruned weight.
"""
from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
METHODS = ("fixed", "lap")
PATTERNS = ("2:4",)
IMPORTANCES = ("weights", "loss")
NM_KEEP, NM_GROUP = 2, 4


@dataclass
class LayerSelection:
    """Which conv / linear weights are compressed. head: the head module names (None: the
    model's spec declares them; needed only when include_head is False)."""

    include_head: bool = True
    head: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()


@dataclass
class Calibration:
    """Batches for a data-driven importance: input tensors, or (inputs, targets, ...) tuples.
    loss_fn(outputs, targets) -> scalar tensor; None: relative output distortion against the
    model as it was when the measurement started (no labels needed)."""

    batches: Sequence[Any]
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None


@dataclass
class PruneOptions:
    sparsity: float = 0.5
    method: str = "fixed"
    pattern: str | None = None
    importance: str = "weights"
    probe_sparsity: float = 0.5
    max_layer_sparsity: float = 0.95
    selection: LayerSelection = field(default_factory=LayerSelection)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"pruning method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.pattern is not None and self.pattern not in PATTERNS:
            raise ValueError(f"pruning pattern must be one of {', '.join(PATTERNS)}, not {self.pattern!r}")
        if self.pattern is not None and self.method != "fixed":
            raise ValueError("the 2:4 pattern fixes the sparsity at 50 % of every eligible layer: use it with "
                             "method 'fixed'")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"layer importance must be one of {', '.join(IMPORTANCES)}, not {self.importance!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 < self.probe_sparsity < 1.0:
            raise ValueError(f"probe sparsity must be in (0, 1), got {self.probe_sparsity}")
        if not 0.0 < self.max_layer_sparsity <= 1.0:
            raise ValueError(f"max layer sparsity must be in (0, 1], got {self.max_layer_sparsity}")
        if self.method == "lap" and self.sparsity > self.max_layer_sparsity:
            raise ValueError(f"sparsity {self.sparsity} is above the max layer sparsity {self.max_layer_sparsity}")


@dataclass
class PruneResult:
    """masks: {weight name: bool tensor, True = kept}. layers: one row per weight (name, weights,
    pruned, sparsity and, for LAP, importance). dense: 2:4 layers left dense (input dim % 4)."""

    masks: dict[str, torch.Tensor]
    layers: list[dict[str, Any]]
    total_sparsity: float
    method: str
    dense: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record (no tensors)."""
        return {"method": self.method, "total_sparsity": self.total_sparsity, "layers": self.layers,
                "dense": list(self.dense)}


# ---- which weights ---------------------------------------------------------------------------

def _head_names(model: nn.Module, selection: LayerSelection) -> tuple[str, ...]:
    if selection.include_head:
        return ()
    if selection.head is not None:
        names = tuple(selection.head)
    else:
        from rsedge.trainer.models import model_spec

        spec = model_spec(model)
        if spec is None:
            raise ValueError(f"{type(model).__name__} declares no head: pass its head module names to leave it out")
        names = spec.head
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no module {', '.join(missing)} (its declared head)")
    return names


def prunable_weights(model: nn.Module, selection: LayerSelection | None = None) -> dict[str, nn.Parameter]:
    """{"<module>.weight": parameter} of the conv / linear layers `selection` keeps, in module
    order; a weight shared by several modules is listed once, under its first name."""
    selection = selection or LayerSelection()
    heads = _head_names(model, selection)
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, PRUNABLE_TYPES) or not isinstance(weight, nn.Parameter):
            continue
        in_head = any(name == h or name.startswith(h + ".") for h in heads)
        excluded = any(fnmatch.fnmatchcase(name, pat) for pat in selection.exclude)
        if in_head or excluded or id(weight) in seen:
            continue
        seen.add(id(weight))
        out[f"{name}.weight" if name else "weight"] = weight
    return out


# ---- calibration -----------------------------------------------------------------------------

@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Calibration reads BatchNorm's running statistics and must not update them."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _flat_outputs(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().float().reshape(-1)
    if isinstance(out, (Mapping, list, tuple)):
        values = out.values() if isinstance(out, Mapping) else out
        return torch.cat([_flat_outputs(v) for v in values])
    raise TypeError(f"model output of type {type(out).__name__} is not a tensor, tuple or dict of tensors")


class CalibrationScorer:
    """The calibration loss of `model` in its current state; `increase()` is the loss minus the
    loss at construction (the reference outputs for the label-free distortion are taken then)."""

    def __init__(self, model: nn.Module, calib: Calibration):
        if not calib.batches:
            raise ValueError("calibration needs at least one batch")
        self.model, self.calib = model, calib
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.reference = None if calib.loss_fn else [_flat_outputs(o) for o in self._outputs()]
        self.base = self.loss()

    def _outputs(self) -> list[Any]:
        outs = []
        with torch.no_grad(), _eval_mode(self.model):
            for batch in self.calib.batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                outs.append(self.model(x.to(self.device)))
        return outs

    def loss(self) -> float:
        outs = self._outputs()
        if self.reference is not None:
            num = sum(float(((_flat_outputs(o) - r) ** 2).sum()) for o, r in zip(outs, self.reference))
            den = sum(float((r ** 2).sum()) for r in self.reference)
            return num / max(den, 1e-30)
        total = 0.0
        for out, batch in zip(outs, self.calib.batches):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("a calibration loss needs (inputs, targets) batches")
            total += float(self.calib.loss_fn(out, batch[1].to(self.device)))
        return total / len(outs)

    def increase(self) -> float:
        return self.loss() - self.base


def layer_sensitivities(model: nn.Module, names: Sequence[str], perturb: Callable[[str, torch.Tensor], torch.Tensor],
                        calib: Calibration) -> dict[str, float]:
    """{name: loss increase when only that weight is replaced by perturb(name, weight)}: one
    layer at a time, each restored before the next, so the numbers are comparable."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the model has no parameter {', '.join(missing)}")
    scorer = CalibrationScorer(model, calib)
    out = {}
    for name in names:
        param = params[name]
        original = param.detach().clone()
        try:
            with torch.no_grad():
                param.copy_(perturb(name, original).to(param.dtype).reshape(param.shape))
            out[name] = scorer.increase()
        finally:
            with torch.no_grad():
                param.copy_(original)
    return out


# ---- magnitude selection ---------------------------------------------------------------------

def _ascending(values: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Indices sorting each row ascending; equal values are ordered by `tiebreak`, then position
    (Q->P prunes on quantized magnitudes, where whole levels tie: the originally smaller go first)."""
    if tiebreak is None:
        return torch.argsort(values, dim=-1, stable=True)
    first = torch.argsort(tiebreak, dim=-1, stable=True)
    second = torch.argsort(values.gather(-1, first), dim=-1, stable=True)
    return first.gather(-1, second)


def _abs(t: torch.Tensor) -> torch.Tensor:
    return t.detach().abs().float().cpu()


def smallest_mask(weight: torch.Tensor, count: int, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask of `weight` with its `count` smallest |w| removed."""
    flat = _abs(weight).reshape(1, -1)
    keep = torch.ones(flat.shape[1], dtype=torch.bool)
    if count > 0:
        tb = None if tiebreak is None else _abs(tiebreak).reshape(1, -1)
        keep[_ascending(flat, tb)[0, :count]] = False
    return keep.reshape(weight.shape)


def magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float,
                    tiebreak: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One global threshold: exactly round(sparsity * N) of the N weights, the smallest |w|, go."""
    names = list(weights)
    if not names:
        return {}
    flat = torch.cat([_abs(weights[n]).reshape(-1) for n in names]).reshape(1, -1)
    tb = None if tiebreak is None else torch.cat([_abs(tiebreak[n]).reshape(-1) for n in names]).reshape(1, -1)
    count = round(sparsity * flat.shape[1])
    keep = torch.ones(flat.shape[1], dtype=torch.bool)
    if count:
        keep[_ascending(flat, tb)[0, :count]] = False
    masks, start = {}, 0
    for n in names:
        size = weights[n].numel()
        masks[n] = keep[start:start + size].reshape(weights[n].shape)
        start += size
    return masks


# ---- layer-adaptive sparsity (LAP) -----------------------------------------------------------

def _layer_fractions(ratio: Sequence[float], scale: float, cap: float) -> list[float]:
    return [min(cap, scale / (1.0 + r)) for r in ratio]


def allocate_sparsity(sizes: Mapping[str, int], importance: Mapping[str, float], sparsity: float,
                      max_layer_sparsity: float = 0.95) -> dict[str, int]:
    """{name: weights to prune}, summing to exactly round(sparsity * N): s_l = min(max, a / (1 +
    r_l)) with r_l = I_l / mean(I), `a` by bisection, counts by largest remainder."""
    names = list(sizes)
    total = sum(sizes.values())
    target = round(sparsity * total)
    caps = {n: int(max_layer_sparsity * sizes[n] + 1e-9) for n in names}
    if target > sum(caps.values()):
        raise ValueError(f"sparsity {sparsity} needs more than the max layer sparsity {max_layer_sparsity} allows")
    values = [max(0.0, float(importance[n])) for n in names]
    mean = sum(values) / len(values) if values else 0.0
    ratio = [v / mean if mean > 0 else 0.0 for v in values]
    low, high = 0.0, (1.0 + max(ratio, default=0.0)) * max_layer_sparsity
    for _ in range(100):
        mid = 0.5 * (low + high)
        got = sum(sizes[n] * s for n, s in zip(names, _layer_fractions(ratio, mid, max_layer_sparsity)))
        low, high = (mid, high) if got < target else (low, mid)
    ideal = {n: sizes[n] * s for n, s in zip(names, _layer_fractions(ratio, high, max_layer_sparsity))}
    counts = {n: min(caps[n], int(ideal[n])) for n in names}
    by_remainder = sorted(names, key=lambda n: ideal[n] - int(ideal[n]), reverse=True)
    while sum(counts.values()) != target:
        step = 1 if sum(counts.values()) < target else -1
        movable = [n for n in by_remainder if (counts[n] < caps[n] if step > 0 else counts[n] > 0)]
        for n in movable if step > 0 else reversed(movable):
            if sum(counts.values()) == target:
                break
            counts[n] += step
    return counts


def lap_importance(model: nn.Module, weights: Mapping[str, torch.Tensor], options: PruneOptions,
                   calib: Calibration | None = None,
                   tiebreak: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """I_l of every layer (see the module docstring): `weights` = energy fraction removed at the
    probe sparsity, `loss` = calibration loss increase with that layer alone pruned there."""
    def pruned(name: str, w: torch.Tensor) -> torch.Tensor:
        tb = None if tiebreak is None else tiebreak[name]
        keep = smallest_mask(w, round(options.probe_sparsity * w.numel()), tb).to(w.device)
        return w * keep

    if options.importance == "loss":
        if calib is None:
            raise ValueError("LAP with the 'loss' importance needs calibration batches")
        return layer_sensitivities(model, list(weights), pruned, calib)
    out = {}
    for name, w in weights.items():
        w = w.detach().float()
        energy = float((w ** 2).sum())
        out[name] = float(((w - pruned(name, w)) ** 2).sum()) / energy if energy > 0 else 0.0
    return out


# ---- 2:4 -------------------------------------------------------------------------------------

def nm_mask(weight: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor | None:
    """Keep-mask with the 2 largest |w| of every 4 consecutive input channels (dim 1) kept, per
    output channel and kernel position; None when dim 1 is not a multiple of 4."""
    if weight.dim() < 2 or weight.shape[1] % NM_GROUP:
        return None
    moved = _abs(weight).movedim(1, -1)
    groups = moved.reshape(-1, NM_GROUP)
    tb = None if tiebreak is None else _abs(tiebreak).movedim(1, -1).reshape(-1, NM_GROUP)
    order = _ascending(groups, tb)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, NM_GROUP - NM_KEEP:], True)
    return keep.reshape(moved.shape).movedim(-1, 1).contiguous()


def is_2_4_sparse(weight: torch.Tensor) -> bool:
    """TensorRT's rule: every 4 consecutive input channels (dim 1) of every output channel and
    kernel position hold at least 2 zeros (False when dim 1 is not a multiple of 4)."""
    if weight.dim() < 2 or weight.shape[1] % NM_GROUP:
        return False
    groups = weight.detach().movedim(1, -1).reshape(-1, NM_GROUP)
    return bool(((groups != 0).sum(dim=1) <= NM_KEEP).all())


# ---- the entry points ------------------------------------------------------------------------

def _rows(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
          importance: Mapping[str, float] | None = None) -> tuple[list[dict[str, Any]], float]:
    rows, pruned_total, total = [], 0, 0
    for name, w in weights.items():
        pruned = int((~masks[name]).sum()) if name in masks else 0
        row = {"name": name, "weights": w.numel(), "pruned": pruned, "sparsity": pruned / max(1, w.numel())}
        if importance is not None:
            row["importance"] = importance[name]
        rows.append(row)
        pruned_total, total = pruned_total + pruned, total + w.numel()
    return rows, pruned_total / max(1, total)


def prune_masks(model: nn.Module, options: PruneOptions | None = None, calib: Calibration | None = None,
                tiebreak: Mapping[str, torch.Tensor] | None = None) -> PruneResult:
    """Masks for the model's prunable weights (the model is not changed). tiebreak: {name:
    tensor} ordering weights of equal magnitude (the float weights, when pruning a quantized copy)."""
    options = options or PruneOptions()
    options.check()
    weights = {n: p.detach() for n, p in prunable_weights(model, options.selection).items()}
    importance, dense = None, []
    if options.pattern == "2:4":
        masks = {}
        for name, w in weights.items():
            mask = nm_mask(w, None if tiebreak is None else tiebreak[name])
            if mask is None:
                dense.append(name)
            else:
                masks[name] = mask
        method = "2:4"
    elif options.method == "lap":
        importance = lap_importance(model, weights, options, calib, tiebreak)
        counts = allocate_sparsity({n: w.numel() for n, w in weights.items()}, importance, options.sparsity,
                                   options.max_layer_sparsity)
        masks = {n: smallest_mask(w, counts[n], None if tiebreak is None else tiebreak[n]) for n, w in weights.items()}
        method = "lap"
    else:
        masks, method = magnitude_masks(weights, options.sparsity, tiebreak), "fixed"
    rows, total = _rows(weights, masks, importance)
    return PruneResult(masks, rows, total, method, dense)


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (mask False = pruned)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"the model has no parameter {name} to mask")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(f"mask of {name} has shape {tuple(mask.shape)}, the weight {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].mul_(mask.to(device=params[name].device, dtype=params[name].dtype))


def keep_masks(optimizer: torch.optim.Optimizer, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Any:
    """Apply `masks` now and again after every `optimizer.step()`, so fine-tuning keeps pruned
    weights at zero whatever the update rule (momentum, weight decay and Adam's moments would
    otherwise move them). Returns the hook handle: `.remove()` stops it."""
    apply_masks(model, masks)
    params = dict(model.named_parameters())
    pairs = [(params[n], m.to(device=params[n].device, dtype=params[n].dtype)) for n, m in masks.items()]

    def reapply(*_: Any) -> None:
        with torch.no_grad():
            for param, mask in pairs:
                param.mul_(mask)

    return optimizer.register_step_post_hook(reapply)


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the masked weights that are pruned."""
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m).sum()) for m in masks.values()) / total if total else 0.0
