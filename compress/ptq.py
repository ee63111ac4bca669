"""Post-training weight quantization, 1-8 bits, for packs that cross a thin radio link.

Every conv / linear weight (the same selection as compress/unstructured.py) becomes a
`QuantizedTensor`: signed integer codes and float32 scales, value = codes * scale, with symmetric
uniform levels. For bits >= 2 the step is s = c / (2**(bits-1) - 1) for a clipping value c and
the codes are round(w / s) clamped to [-(2**(bits-1)), 2**(bits-1) - 1] (the one extra negative
level is free in two's complement); for 1 bit the value is sign(w) * s (code -1 or +1).
`dequantize` is runtime/pack.py's, so the host's fake-quantized model and the device's unpacked
weights come from one definition.

- Scales per output channel (axis 0) or per tensor.
- Clipping: `minmax` (c = max|w|: one outlier stretches the grid over everything, which is how
  uniform 4-bit quantization collapses to chance in the seed's Table 2) or `mse` (c = f * max|w|
  with f on a grid of `grid` fractions in (0, 1], chosen per channel when per channel, minimizing
  the squared error of the dequantized kept weights; f = 1 is on the grid, so `mse` is never
  worse than `minmax`). At 1 bit, `mse` is the exact optimum s = mean|w| and `minmax` s = max|w|.
- Pruned weights (mask False) are code 0 and stay exactly zero; at 1 bit no code is zero and the
  mask alone zeroes them (the contract with the pack format).

LAQ (layer-adaptive bit widths, after Shinde, "Adaptive quantization and pruning of deep neural
networks via layer importance estimation", NeurIPS 2024 Compression Workshop, as cited by the
seed paper). Our definition: each layer gets a width from `candidates` so that the stored bits
(`storage_bits`: kept codes * bits + one mask bit per weight when pruned + 32 bits per scale) sum
to at most the budget (given, or 32 * weights / target_cr). Sensitivity of layer l at b bits:
  - `weights` (data-free): e_l(b) = ||Q_b(W_l) - W_l||^2 / ||W_l||^2, the relative error energy
    of the kept weights (scale-free, so a conv before BatchNorm is judged by its distribution);
  - `loss`: D_l * e_l(b) / e_l(probe_bits), D_l the calibration loss increase (loss_fn, or the
    label-free relative output distortion) with layer l alone quantized at `probe_bits`: measured
    once per layer and carried to other widths by the layer's own error curve (to second order
    the loss grows with the error energy). The probe is 4 bits, not the lowest width: at 2 bits
    many single layers already drive a network to chance, which flattens the ranking.
Greedy allocation: every layer starts at the lowest width; repeatedly the one upgrade (a layer
to its next candidate width) with the largest sensitivity decrease per added stored bit that
still fits the budget is taken, until none fits.

Orders: `prune_then_quantize` (P->Q: masks from the float weights, then quantization of the kept
weights, LAQ counting the pruned layers' smaller storage) and `quantize_then_prune` (Q->P: LAQ and
quantization of the dense model, then pruning by the magnitudes of the dequantized weights, ties
broken by the float magnitudes, and the pruned codes set to 0 on the same grid).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from rsedge.runtime.pack import code_range, dequantize  # the grid host and device share

from .unstructured import (
    Calibration,
    LayerSelection,
    PruneOptions,
    PruneResult,
    apply_masks,
    layer_sensitivities,
    prunable_weights,
    prune_masks,
)

CLIPPINGS = ("minmax", "mse")
LAQ_CANDIDATES = (2, 3, 4, 5, 6, 8)
SCALE_BITS = 32
FP32_BITS = 32


@dataclass
class QuantizedTensor:
    """The contract's quantized weight: value = codes * scale (broadcast on `axis`), 0 where
    mask is False. codes int8; scale float32, shape (C,) for axis 0 or (1,) for axis None."""

    codes: np.ndarray
    bits: int
    scale: np.ndarray
    axis: int | None
    mask: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        return dequantize(self)


@dataclass
class QuantOptions:
    bits: int = 8
    per_channel: bool = True
    clipping: str = "mse"
    grid: int = 80
    selection: LayerSelection = field(default_factory=LayerSelection)

    def check(self) -> None:
        _check_bits(self.bits)
        if self.clipping not in CLIPPINGS:
            raise ValueError(f"clipping must be one of {', '.join(CLIPPINGS)}, not {self.clipping!r}")
        if self.grid < 1:
            raise ValueError(f"the clipping grid needs at least 1 point, got {self.grid}")


@dataclass
class LAQOptions:
    """Exactly one of budget_bits / target_cr (CR against FP32 weights: budget = 32 N / CR)."""

    candidates: tuple[int, ...] = LAQ_CANDIDATES
    budget_bits: int | None = None
    target_cr: float | None = None
    importance: str = "weights"
    probe_bits: int = 4

    def check(self) -> None:
        if not self.candidates:
            raise ValueError("LAQ needs at least one candidate bit width")
        for b in (*self.candidates, self.probe_bits):
            _check_bits(b)
        if (self.budget_bits is None) == (self.target_cr is None):
            raise ValueError("LAQ needs exactly one of a bit budget and a target compression ratio")
        if self.target_cr is not None and self.target_cr <= 0:
            raise ValueError(f"target compression ratio must be positive, got {self.target_cr}")
        if self.importance not in ("weights", "loss"):
            raise ValueError(f"LAQ importance must be 'weights' or 'loss', not {self.importance!r}")


@dataclass
class LAQResult:
    bits: dict[str, int]
    layers: list[dict[str, Any]]
    budget_bits: int
    used_bits: int

    def to_dict(self) -> dict[str, Any]:
        return {"budget_bits": self.budget_bits, "used_bits": self.used_bits, "layers": self.layers}


@dataclass
class Compressed:
    """What a P->Q or Q->P recipe produced: the quantized weights, the pruning and LAQ records."""

    order: str
    qtensors: dict[str, QuantizedTensor]
    prune: PruneResult | None
    laq: LAQResult | None

    def to_dict(self) -> dict[str, Any]:
        return {"order": self.order, "prune": self.prune.to_dict() if self.prune else None,
                "laq": self.laq.to_dict() if self.laq else None,
                "bits": {n: q.bits for n, q in self.qtensors.items()},
                "storage_bits": sum(storage_bits(q) for q in self.qtensors.values())}


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= int(bits) <= 8:
        raise ValueError(f"bit width must be an integer from 1 to 8, got {bits!r}")
    return int(bits)


# ---- one tensor ------------------------------------------------------------------------------

def _codes(rows: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Float codes of `rows` ([R, n]) on the grid of `scale` ([R]); a zero scale (an all-zero
    row) gives code 0, which dequantizes to 0 whatever the scale."""
    if bits == 1:
        return torch.where(rows < 0, -1.0, 1.0)
    low, high = code_range(bits)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    return torch.clamp(torch.round(rows / safe), low, high)


def _search_scale(rows: torch.Tensor, keep: torch.Tensor, bits: int, clipping: str, grid: int) -> torch.Tensor:
    """One float32 scale per row: min-max, or the clipping fraction on the grid with the least
    squared error over the kept weights (f = 1, i.e. min-max, is a candidate)."""
    kept_abs = rows.abs() * keep
    peak = kept_abs.amax(dim=1)
    if bits == 1:
        return peak if clipping == "minmax" else kept_abs.sum(dim=1) / keep.sum(dim=1).clamp(min=1)
    qmax = float((1 << (bits - 1)) - 1)
    best = peak / qmax
    if clipping == "minmax":
        return best
    best_err = torch.full_like(peak, float("inf"))
    for i in range(1, grid + 1):
        scale = peak * (i / grid) / qmax
        err = (((_codes(rows, scale, bits) * scale[:, None] - rows) ** 2) * keep).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best


def _as_float(weight: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(weight, np.ndarray):
        return torch.from_numpy(np.asarray(weight, dtype=np.float32))
    return weight.detach().float().cpu()


def quantize_tensor(weight: torch.Tensor | np.ndarray, options: QuantOptions | None = None,
                    mask: torch.Tensor | np.ndarray | None = None, bits: int | None = None) -> QuantizedTensor:
    """Quantize one weight (bits: overrides options.bits). Pruned weights (mask False) do not
    count in the scale search and get code 0 (+1 at 1 bit, zeroed by the mask)."""
    options = options or QuantOptions()
    options.check()
    bits = _check_bits(options.bits if bits is None else bits)
    w = _as_float(weight)
    if w.dim() == 0:
        raise ValueError("cannot quantize a scalar weight")
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool).cpu()
    if keep.shape != w.shape:
        raise ValueError(f"mask shape {tuple(keep.shape)} differs from weight shape {tuple(w.shape)}")
    rows_shape = (w.shape[0], -1) if options.per_channel else (1, -1)
    rows, krows = w.reshape(rows_shape), keep.reshape(rows_shape)
    scale = _search_scale(rows, krows.float(), bits, options.clipping, options.grid)
    codes = _codes(rows, scale, bits)
    codes = torch.where(krows, codes, torch.full_like(codes, 1.0 if bits == 1 else 0.0))
    kept_mask = None if bool(keep.all()) else keep.numpy().copy()
    return QuantizedTensor(codes.reshape(w.shape).numpy().astype(np.int8), bits,
                           scale.numpy().astype(np.float32), 0 if options.per_channel else None, kept_mask)


def mask_codes(qt: QuantizedTensor, mask: torch.Tensor | np.ndarray) -> QuantizedTensor:
    """`qt` with the weights where `mask` is False pruned on the same grid: code 0 (bits >= 2),
    mask False (always)."""
    keep = np.asarray(mask.cpu().numpy() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    if keep.shape != qt.codes.shape:
        raise ValueError(f"mask shape {keep.shape} differs from codes shape {qt.codes.shape}")
    if qt.mask is not None:
        keep = keep & qt.mask
    codes = qt.codes.copy()
    codes[~keep] = 1 if qt.bits == 1 else 0
    return QuantizedTensor(codes, qt.bits, qt.scale.copy(), qt.axis, None if keep.all() else keep)


def storage_bits(qt: QuantizedTensor) -> int:
    """Bits the pack stores for `qt` before its lossless compression: the kept codes, one bitmap
    bit per weight when masked, 32 per scale."""
    kept = qt.codes.size if qt.mask is None else int(qt.mask.sum())
    return kept * qt.bits + (qt.codes.size if qt.mask is not None else 0) + SCALE_BITS * qt.scale.size


def _storage_cost(weight: torch.Tensor, mask: torch.Tensor | None, bits: int, per_channel: bool) -> int:
    """storage_bits of `weight` quantized at `bits`, without quantizing it."""
    masked = mask is not None and not bool(mask.all())
    kept = int(mask.sum()) if masked else weight.numel()
    channels = weight.shape[0] if per_channel else 1
    return kept * bits + (weight.numel() if masked else 0) + SCALE_BITS * channels


def relative_error(weight: torch.Tensor | np.ndarray, qt: QuantizedTensor) -> float:
    """||dequantize(qt) - w||^2 / ||w||^2 over the kept weights (0 for an all-zero weight)."""
    w = _as_float(weight).numpy()
    keep = np.ones(w.shape, dtype=bool) if qt.mask is None else qt.mask
    energy = float(np.sum(np.where(keep, w, 0.0) ** 2, dtype=np.float64))
    diff = np.where(keep, dequantize(qt) - w, 0.0)
    return float(np.sum(diff ** 2, dtype=np.float64)) / energy if energy > 0 else 0.0


# ---- a model ---------------------------------------------------------------------------------

def quantize_model(model: nn.Module, options: QuantOptions | None = None,
                   masks: Mapping[str, torch.Tensor] | None = None,
                   bits: Mapping[str, int] | None = None) -> dict[str, QuantizedTensor]:
    """{weight name: QuantizedTensor} for the selected conv / linear weights; bits: per-layer
    widths (LAQ), else options.bits for all."""
    options = options or QuantOptions()
    options.check()
    weights = prunable_weights(model, options.selection)
    unknown = [n for n in list(masks or {}) + list(bits or {}) if n not in weights]
    if unknown:
        raise ValueError(f"masks or bit widths name weights that are not quantized: {', '.join(sorted(set(unknown)))}")
    return {n: quantize_tensor(w, options, (masks or {}).get(n), (bits or {}).get(n)) for n, w in weights.items()}


def fake_quantize_model(model: nn.Module, qtensors: Mapping[str, QuantizedTensor]) -> nn.Module:
    """A copy of `model` whose quantized weights are their dequantized values (bit-exactly what
    the device unpacks): for accuracy evaluation and ONNX export."""
    fake = copy.deepcopy(model)
    params = dict(fake.named_parameters())
    for name, qt in qtensors.items():
        if name not in params:
            raise ValueError(f"the model has no parameter {name}")
        value = torch.from_numpy(dequantize(qt))
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(f"quantized {name} has shape {tuple(value.shape)}, "
                             f"the model's {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(value.to(params[name].dtype))
    return fake


# ---- LAQ -------------------------------------------------------------------------------------

def _error_curves(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], options: QuantOptions,
                  widths: Sequence[int]) -> dict[str, dict[int, float]]:
    """{name: {bits: e_l(bits)}}, the relative error energy of the layer quantized at each width."""
    return {n: {b: relative_error(w, quantize_tensor(w, options, masks.get(n), b)) for b in widths}
            for n, w in weights.items()}


def laq_sensitivity(model: nn.Module, laq: LAQOptions, quant: QuantOptions,
                    masks: Mapping[str, torch.Tensor] | None = None,
                    calib: Calibration | None = None) -> dict[str, dict[int, float]]:
    """{name: {bits: sensitivity}} for every candidate width (definitions in the module docstring)."""
    masks = masks or {}
    weights = {n: p.detach() for n, p in prunable_weights(model, quant.selection).items()}
    widths = sorted(set(laq.candidates) | {laq.probe_bits})
    curves = _error_curves(weights, masks, quant, widths)
    if laq.importance == "weights":
        return {n: {b: curves[n][b] for b in laq.candidates} for n in weights}
    if calib is None:
        raise ValueError("LAQ with the 'loss' importance needs calibration batches")

    def probe(name: str, w: torch.Tensor) -> torch.Tensor:
        qt = quantize_tensor(w, quant, masks.get(name), laq.probe_bits)
        return torch.from_numpy(dequantize(qt)).to(w.device)

    measured = layer_sensitivities(model, list(weights), probe, calib)
    out = {}
    for n in weights:
        at_probe = curves[n][laq.probe_bits]
        level = max(0.0, measured[n]) / at_probe if at_probe > 0 else 0.0
        out[n] = {b: level * curves[n][b] for b in laq.candidates}
    return out


def allocate_bits(costs: Mapping[str, Mapping[int, int]], sensitivity: Mapping[str, Mapping[int, float]],
                  budget_bits: int, candidates: Sequence[int]) -> dict[str, int]:
    """Greedy: all layers at the lowest width, then the upgrade to a layer's next width with the
    largest sensitivity decrease per added bit that fits, until none fits."""
    order = sorted(set(candidates))
    level = dict.fromkeys(costs, 0)
    used = sum(costs[n][order[0]] for n in costs)
    if used > budget_bits:
        raise ValueError(f"the budget of {budget_bits} bits is below the {used} bits every layer needs "
                         f"at {order[0]} bits")
    while True:
        best, best_key = None, None
        for n in costs:
            if level[n] + 1 >= len(order):
                continue
            low, high = order[level[n]], order[level[n] + 1]
            added = costs[n][high] - costs[n][low]
            if used + added > budget_bits:
                continue
            key = ((sensitivity[n][low] - sensitivity[n][high]) / max(added, 1), -added)
            if best_key is None or key > best_key:
                best, best_key = n, key
        if best is None:
            return {n: order[level[n]] for n in costs}
        used += costs[best][order[level[best] + 1]] - costs[best][order[level[best]]]
        level[best] += 1


def laq_bits(model: nn.Module, laq: LAQOptions, quant: QuantOptions | None = None,
             masks: Mapping[str, torch.Tensor] | None = None, calib: Calibration | None = None) -> LAQResult:
    """A bit width per quantized weight under the budget (LAQ). The budget from target_cr is
    32 bits per weight of the selected weights, divided by the CR."""
    laq.check()
    quant = quant or QuantOptions()
    quant.check()
    masks = masks or {}
    weights = {n: p.detach() for n, p in prunable_weights(model, quant.selection).items()}
    budget = laq.budget_bits
    if budget is None:
        budget = int(FP32_BITS * sum(w.numel() for w in weights.values()) / laq.target_cr)
    costs = {n: {b: _storage_cost(w, masks.get(n), b, quant.per_channel) for b in laq.candidates}
             for n, w in weights.items()}
    sensitivity = laq_sensitivity(model, laq, quant, masks, calib)
    bits = allocate_bits(costs, sensitivity, budget, laq.candidates)
    layers = [{"name": n, "weights": w.numel(), "bits": bits[n], "storage_bits": costs[n][bits[n]],
               "sensitivity": sensitivity[n][bits[n]]} for n, w in weights.items()]
    return LAQResult(bits, layers, int(budget), sum(costs[n][bits[n]] for n in weights))


# ---- P->Q and Q->P ---------------------------------------------------------------------------

def _check_covered(pruned: PruneResult, quant: QuantOptions, model: nn.Module) -> None:
    """A pruned weight that is not quantized would be lost from the result: refuse it."""
    quantized = prunable_weights(model, quant.selection)
    stray = [n for n in pruned.masks if n not in quantized]
    if stray:
        raise ValueError(f"pruned weights that are not quantized: {', '.join(stray)} (widen the quantization "
                         f"selection or narrow the pruning one)")


def prune_then_quantize(model: nn.Module, prune: PruneOptions, quant: QuantOptions | None = None,
                        laq: LAQOptions | None = None, calib: Calibration | None = None) -> Compressed:
    """P->Q: masks from the float weights, then the kept weights quantized (LAQ, when given,
    chooses widths on the pruned model with its smaller storage). `model` is not changed."""
    quant = quant or QuantOptions()
    pruned = prune_masks(model, prune, calib)
    _check_covered(pruned, quant, model)
    work = copy.deepcopy(model)
    apply_masks(work, pruned.masks)
    chosen = laq_bits(work, laq, quant, pruned.masks, calib) if laq is not None else None
    qtensors = quantize_model(work, quant, pruned.masks, chosen.bits if chosen else None)
    return Compressed("P->Q", qtensors, pruned, chosen)


def quantize_then_prune(model: nn.Module, prune: PruneOptions, quant: QuantOptions | None = None,
                        laq: LAQOptions | None = None, calib: Calibration | None = None) -> Compressed:
    """Q->P: the dense model quantized (LAQ on the dense model), then pruned by the magnitudes of
    its dequantized weights (ties by the float magnitudes), the pruned codes zeroed on the same
    grid. `model` is not changed."""
    quant = quant or QuantOptions()
    chosen = laq_bits(model, laq, quant, None, calib) if laq is not None else None
    qtensors = quantize_model(model, quant, None, chosen.bits if chosen else None)
    fake = fake_quantize_model(model, qtensors)
    floats = {n: p.detach() for n, p in prunable_weights(model, prune.selection).items()}
    pruned = prune_masks(fake, prune, calib, tiebreak=floats)
    _check_covered(pruned, quant, model)
    qtensors = {n: mask_codes(qt, pruned.masks[n]) if n in pruned.masks else qt for n, qt in qtensors.items()}
    return Compressed("Q->P", qtensors, pruned, chosen)
