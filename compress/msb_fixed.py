"""MSB fixed-point weight quantization (seed 002, section 2.3): per layer, the binary point of an
n-bit word is chosen from the histogram of the weights' most-significant-bit positions.

The rule, exactly:

- A layer is one weight tensor of a Conv / ConvTranspose / Linear module, and (by default) its bias
  as a tensor of its own: the paper quantizes "all weights" and logs biases beside weights.
  Normalization layers (BatchNorm, LayerNorm: affine parameters and running statistics) and any
  other tensor stay float32 and are counted as float in the weight memory; they are not folded.
- The MSB position of a weight w != 0 is e = floor(log2 |w|) (exact, from its float exponent).
- An n-bit word is a sign and m = n - 1 magnitude bits: with f fractional bits its bit positions
  are -f .. m-1-f, it holds q * 2^-f for integers q in [-(2^m - 1), 2^m - 1]. The range is
  symmetric: the two's-complement code -2^m is not used, so -w quantizes to minus what w does
  and a sign can always be flipped (an exporter's folded negative BatchNorm scale).
- `window="majority"` (the paper's "the 8-bit range must encompass the majority of MSB bits"):
  of the windows of m consecutive bit positions whose top is a position some MSB occupies, the
  one holding the most MSBs; on a tie the higher one, because a saturated weight can lose any
  amount while an underflowed one loses less than a step. `window="max"`: the window whose top
  holds the largest weight's MSB (nothing saturates by more than half a step). `window="mse"`:
  of the windows whose top is an occupied position at most m below the largest MSB, the one with
  the least squared error over the tensor's values (ties: the higher). Then f = m - 1 - top
  (kept within +-126, so every value stays a normal float32). An all-zero tensor gets f = m - 1
  (any f stores zeros exactly).
- q = sign(w) * floor(|w| * 2^f + 1/2) (round to nearest, ties away from zero), then clipped to
  +-(2^m - 1). Underflow: w != 0 whose q is 0 (|w| < half a step); saturation: |q| clipped. Both
  are counted as fractions of the layer's nonzero weights.

The paper's example, n = 8, f = 3 (steps of 0.125, largest 15.875): 0.03125 underflows to 0,
2.1 becomes 2.125, 16.25 saturates to 15.875 (the paper prints 15.874). The paper also says every
value below the smallest step becomes 0, which would be truncation; its 2.1 -> 2.125 is rounding,
which is what is done here: |w| in [0.0625, 0.125) becomes 0.125.

A quantized model is an ordinary float model whose quantized tensors hold q * 2^-f exactly, so
PyTorch evaluates it as is; the model file stores q as int8 (int16 above 8 bits) and f in its
metadata (`trainer.modelfile`), `export.msb_onnx` writes int8 initializers behind
DequantizeLinear. Quantizing needs no data and no retraining (the paper: "a statistical
approach"); prune first, then quantize: a quantized model is not pruned or quantized again.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rsedge.trainer.modelfile import EXTRA_PREFIX, QUANT_KEY, fixed_point_tensors

SCHEME = "msb-fixed"
SCHEMES = (SCHEME,)
WINDOWS = ("majority", "max", "mse")
MIN_BITS, MAX_BITS = 4, 16
QUANTIZED_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                     nn.ConvTranspose3d, nn.Linear)
MB = 1e6  # "memory (MB)": decimal megabytes
MAX_FRAC_BITS = 126  # |f| at most this: 2^-f and every q * 2^-f stay normal float32 numbers


@dataclass
class MsbOptions:
    """How weights are quantized: word length, the window rule, and whether biases are too."""

    bits: int = 8
    window: str = "majority"
    biases: bool = True

    def check(self) -> MsbOptions:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"--bits must be an integer from {MIN_BITS} to {MAX_BITS}, not {self.bits!r}")
        if self.window not in WINDOWS:
            raise ValueError(f"unknown --window {self.window!r}; choose from {', '.join(WINDOWS)}")
        return self


@dataclass(frozen=True)
class QuantizedTensor:
    """One layer's weights as a fixed-point word: integers `ints` (int8, or int16 above 8 bits)
    times 2^-frac_bits."""

    ints: torch.Tensor
    frac_bits: int
    bits: int

    @property
    def scale(self) -> float:
        return 2.0 ** -self.frac_bits

    def dequantize(self) -> torch.Tensor:
        return torch.ldexp(self.ints.to(torch.float32), torch.tensor(-self.frac_bits, dtype=torch.float32))


@dataclass
class QuantizedWeights:
    """The quantized tensors of a model by state-dict name: what the model file and the ONNX store."""

    bits: int
    tensors: dict[str, QuantizedTensor] = field(default_factory=dict)

    def frac_bits(self) -> dict[str, int]:
        return {k: t.frac_bits for k, t in self.tensors.items()}


# -- one tensor ----------------------------------------------------------------------------------

def msb_positions(w: torch.Tensor) -> torch.Tensor:
    """floor(log2 |w|) of the nonzero elements, exactly: |w| = m * 2^e with m in [0.5, 1)."""
    nz = w[w != 0].double()
    _, exponent = torch.frexp(nz)
    return exponent.to(torch.int64) - 1


def msb_histogram(w: torch.Tensor) -> dict[int, int]:
    """{MSB position: how many nonzero weights have their MSB there}."""
    pos = msb_positions(w)
    if not pos.numel():
        return {}
    low = int(pos.min())
    counts = torch.bincount(pos - low)
    return {low + i: int(c) for i, c in enumerate(counts.tolist()) if c}


def choose_frac_bits(histogram: Mapping[int, int], bits: int = 8, window: str = "majority",
                     values: torch.Tensor | None = None) -> int:
    """f for a histogram of MSB positions, by the module's rule; `mse` also needs the `values`."""
    m = bits - 1
    occupied = sorted(p for p, c in histogram.items() if c > 0)
    if not occupied:
        return m - 1
    if window == "max":
        top = occupied[-1]
    elif window == "majority":
        inside = {t: sum(histogram[p] for p in occupied if t - m < p <= t) for t in occupied}
        top = max(occupied, key=lambda t: (inside[t], t))
    elif window == "mse":
        if values is None:
            raise ValueError("the mse window rule needs the values, not only their histogram")
        w = values.detach().cpu().double()
        candidates = [t for t in occupied if t >= occupied[-1] - m]
        error = {t: float((QuantizedTensor(quantize_fixed(w, m - 1 - t, bits)[0], m - 1 - t, bits).dequantize()
                           .double() - w).square().sum()) for t in candidates}
        top = min(candidates, key=lambda t: (error[t], -t))
    else:
        raise ValueError(f"unknown window rule {window!r}; choose from {', '.join(WINDOWS)}")
    return max(-MAX_FRAC_BITS, min(MAX_FRAC_BITS, m - 1 - top))


def quantize_fixed(w: torch.Tensor, frac_bits: int, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers q, which were clipped) of `w` on the grid 2^-frac_bits, symmetric n-bit range."""
    qmax = 2 ** (bits - 1) - 1
    # exact in float32: scaling by a power of two, and |x| + 1/2 below 2^23 (above, it saturates anyway)
    scaled = torch.ldexp(w.float(), torch.tensor(frac_bits, dtype=torch.float32))
    q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    clipped = q.abs() > qmax
    return q.clamp(-qmax, qmax).to(torch.int8 if bits <= 8 else torch.int16), clipped


def quantize_tensor(w: torch.Tensor, bits: int = 8, window: str = "majority",
                    frac_bits: int | None = None) -> tuple[QuantizedTensor, dict[str, Any]]:
    """`w` quantized by the rule (or at a given `frac_bits`) and its statistics: f, the window of
    bit positions, underflow and saturation (fractions of the nonzero weights), errors and the
    MSB histogram."""
    w = w.detach().cpu()
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a tensor holding inf or NaN")
    hist = msb_histogram(w)
    f = choose_frac_bits(hist, bits, window, w) if frac_bits is None else int(frac_bits)
    q, clipped = quantize_fixed(w, f, bits)
    qt = QuantizedTensor(q, f, bits)
    n_nonzero = sum(hist.values())
    underflow = int(((q == 0) & (w != 0)).sum())
    saturated = int(clipped.sum())
    err = (qt.dequantize().double() - w.double()).abs()
    stats = {
        "shape": list(w.shape), "numel": w.numel(), "nonzero": n_nonzero, "frac_bits": f,
        "window": [-f, bits - 2 - f], "max_value": (2 ** (bits - 1) - 1) * 2.0 ** -f,
        "underflow": underflow / max(n_nonzero, 1), "saturated": saturated / max(n_nonzero, 1),
        "underflow_count": underflow, "saturated_count": saturated,
        "max_abs_error": float(err.max()) if err.numel() else 0.0,
        "mean_abs_error": float(err.mean()) if err.numel() else 0.0,
        "msb_histogram": {str(p): c for p, c in hist.items()},
    }
    return qt, stats


# -- a model -------------------------------------------------------------------------------------

def quantizable_tensors(model: nn.Module, biases: bool = True) -> list[tuple[str, str, nn.Parameter]]:
    """(module name, state-dict key, parameter) of every weight (and bias) the method quantizes."""
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, QUANTIZED_MODULES):
            continue
        for attr in ("weight", "bias") if biases else ("weight",):
            p = getattr(m, attr, None)
            if isinstance(p, torch.Tensor):
                found.append((name, f"{name}.{attr}" if name else attr, p))
    return found


@torch.no_grad()
def msb_quantize_model(model: nn.Module, bits: int = 8, options: MsbOptions | None = None
                       ) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize `model` in place: each weight tensor becomes q * 2^-f (float32, exactly).
    Returns the model and the record: scheme, bits, window rule, and per tensor (state-dict key)
    its layer, f, window, underflow, saturation, errors and MSB histogram."""
    o = (options or MsbOptions(bits=bits)).check()
    layers: dict[str, dict[str, Any]] = {}
    seen: dict[int, str] = {}
    for module_name, key, p in quantizable_tensors(model, o.biases):
        if id(p) in seen:  # a tied weight is one tensor
            layers[key] = {**layers[seen[id(p)]], "tied_to": seen[id(p)]}
            continue
        seen[id(p)] = key
        qt, stats = quantize_tensor(p, o.bits, o.window)
        p.copy_(qt.dequantize().to(p.dtype))
        layers[key] = {"layer": module_name, "kind": key.rpartition(".")[2], **stats}
    if not layers:
        raise ValueError("the model has no Conv or Linear weights to quantize")
    return model, {"scheme": SCHEME, "bits": o.bits, "window": o.window, "biases": o.biases, "layers": layers}


META_STATS = ("frac_bits", "underflow", "saturated", "max_abs_error")


def quantization_meta(record: dict[str, Any]) -> dict[str, Any]:
    """The model file's `quantization` metadata: what loading needs (bits, f per tensor) and the
    per-layer numbers a reader wants without record.json; the histograms stay in the record."""
    return {"scheme": record["scheme"], "bits": record["bits"], "window": record["window"],
            "biases": record["biases"],
            "layers": {k: {s: v[s] for s in META_STATS} for k, v in record["layers"].items()}}


def quantized_weights(model_or_state: nn.Module | Mapping[str, torch.Tensor],
                      quantization: dict[str, Any]) -> QuantizedWeights:
    """The integers of a quantized model (a loaded one holds q * 2^-f as float32) or of a
    file's raw tensors (int8 already), by the `quantization` metadata."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    bits, fracs = fixed_point_tensors(quantization)
    out = QuantizedWeights(bits)
    for key, f in fracs.items():
        v = state[key].detach().cpu()
        if v.is_floating_point():
            q, clipped = quantize_fixed(v, f, bits)
            if clipped.any() or not torch.equal(QuantizedTensor(q, f, bits).dequantize(), v.float()):
                raise ValueError(f"{key} does not hold {bits}-bit fixed-point values of step 2^-{f}")
        else:
            q = v
        out.tensors[key] = QuantizedTensor(q, f, bits)
    return out


def check_not_quantized(meta: dict[str, Any], action: str) -> None:
    """Refuse to prune or quantize again a model whose weights are already fixed-point: pruning
    or re-quantizing it would change the integers the file stores (prune first, then quantize)."""
    quant = meta.get(QUANT_KEY)
    if quant:
        raise ValueError(f"this model's weights are already {quant.get('bits')}-bit {quant.get('scheme')} "
                         f"(rsedge quantize): {action} the float model it was made from instead "
                         "(prune first, then quantize)")


# -- memory --------------------------------------------------------------------------------------

def weight_memory(model_or_state: nn.Module | Mapping[str, torch.Tensor],
                  quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the weights occupy, the paper's "memory": quantized tensors at their stored width
    (1 byte up to 8 bits, 2 above; a 4-bit word still takes a byte) plus one byte for each
    tensor's exponent; every other floating tensor the model needs (biases kept float,
    BatchNorm parameters and running statistics) at its own width (4 bytes for float32).
    Integer bookkeeping buffers (BatchNorm's batch counter) are not weights. `params` counts the
    elements of the same tensors."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    bits, fracs = fixed_point_tensors(quantization)
    width = 1 if bits <= 8 else 2
    out = {"bytes": 0, "quantized_bytes": 0, "exponent_bytes": 0, "float_bytes": 0, "quantized_params": 0,
           "float_params": 0}
    for key, v in state.items():
        if key.startswith(EXTRA_PREFIX):
            continue
        if key in fracs:
            out["quantized_bytes"] += v.numel() * width
            out["exponent_bytes"] += 1
            out["quantized_params"] += v.numel()
        elif v.is_floating_point():
            out["float_bytes"] += v.numel() * v.element_size()
            out["float_params"] += v.numel()
    out["bytes"] = out["quantized_bytes"] + out["exponent_bytes"] + out["float_bytes"]
    out["params"] = out["quantized_params"] + out["float_params"]
    out["mb"] = out["bytes"] / MB
    return out


def weight_memory_bytes(model_or_state: nn.Module | Mapping[str, torch.Tensor],
                        quantization: dict[str, Any] | None = None) -> int:
    """`weight_memory(...)["bytes"]`: of a float model (4 bytes a float32 weight) or a quantized one."""
    return int(weight_memory(model_or_state, quantization)["bytes"])


# -- summaries -----------------------------------------------------------------------------------

def summarize(record: dict[str, Any]) -> dict[str, Any]:
    """Mean and worst underflow and saturation over the quantized tensors (ties counted once)."""
    rows = {k: v for k, v in record["layers"].items() if "tied_to" not in v}
    under = {k: v["underflow"] for k, v in rows.items()}
    sat = {k: v["saturated"] for k, v in rows.items()}
    worst_u, worst_s = max(under, key=under.get), max(sat, key=sat.get)
    return {"tensors": len(rows), "mean_underflow": sum(under.values()) / len(rows),
            "max_underflow": under[worst_u], "max_underflow_tensor": worst_u,
            "mean_saturated": sum(sat.values()) / len(rows), "max_saturated": sat[worst_s],
            "max_saturated_tensor": worst_s,
            "max_abs_error": max(v["max_abs_error"] for v in rows.values())}


def plot_layers(record: dict[str, Any], count: int = 6) -> list[str]:
    """Up to `count` weight tensors spread evenly from the first layer to the last."""
    keys = [k for k, v in record["layers"].items() if v["kind"] == "weight" and "tied_to" not in v]
    if len(keys) <= count:
        return keys
    return [keys[round(i * (len(keys) - 1) / (count - 1))] for i in range(count)] if count > 1 else keys[:1]


def plot_msb_histograms(record: dict[str, Any], path: str | Path, count: int = 6) -> Path:
    """The MSB histograms of a few layers with the chosen window shaded, as in the paper's
    Figure 1 (its heat map of MSB counts per bit position)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = plot_layers(record, count)
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        s = record["layers"][key]
        hist = {int(p): c for p, c in s["msb_histogram"].items()}
        lo, hi = s["window"]
        xs = sorted(set(hist) | {lo, hi})
        colors = ["tab:red" if e > hi else "tab:gray" if e < lo else "tab:blue" for e in hist]
        ax.bar(list(hist), list(hist.values()), color=colors, width=0.8)
        ax.set_yscale("log")
        ax.axvspan(lo - 0.5, hi + 0.5, color="tab:green", alpha=0.15, label=f"{record['bits']}-bit window")
        ax.set_xticks(range(min(xs), max(xs) + 1, max(1, (max(xs) - min(xs)) // 8)))
        ax.set_title(f"{key}\nf={s['frac_bits']}, underflow {100 * s['underflow']:.2f} %, "
                     f"saturated {100 * s['saturated']:.2f} %", fontsize=8)
        ax.set_xlabel("MSB position e (|w| in [2^e, 2^(e+1)))", fontsize=8)
        ax.set_ylabel("weights (log)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"MSB positions of the weights and the chosen {record['bits']}-bit windows ({record['window']}); "
                 "grey: below the window, red: above it", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the `quantize` stage ------------------------------------------------------------------------

PLOT_NAME = "msb_histograms.png"
# --exist-ok removes all of an earlier run, so no plot outlives the record that described it
QUANTIZE_RUN_FILES = ("record.json", "model.safetensors", PLOT_NAME)

@dataclass
class QuantizeOptions:
    """`rsedge quantize`: the scheme and its settings, and the images (if any) the model is
    evaluated on before and after."""

    scheme: str = SCHEME
    bits: int = 8
    window: str = "majority"
    biases: bool = True
    data: str | Path | None = None  # evaluate before/after on the test part of the model's split (or every image)
    batch_size: int = 64
    workers: int = 0
    device: str = "auto"
    plot_layers: int = 6
    exist_ok: bool = False
    progress: bool = True

    def msb(self) -> MsbOptions:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown --scheme {self.scheme!r}; choose from {', '.join(SCHEMES)}")
        return MsbOptions(self.bits, self.window, self.biases).check()


def evaluation_set(meta: dict[str, Any], data: str | Path) -> tuple[Any, str, bool]:
    """The task's evaluation dataset: the test part of the model's split when `data` is its
    folder, otherwise every readable image of `data`; what it is, in words; whether it is the
    model's own test split."""
    from rsedge.trainer.stage import model_items, model_split
    from rsedge.trainer.tasks import task_for

    src = model_items(meta, data, "test")
    if src is None or not src[1]:
        raise ValueError(f"no labeled images to evaluate on in {data}")
    own = model_split(meta, data) is not None
    part = "the model's test split" if own else "every image"
    return task_for(meta).eval_dataset(src[0], src[1], meta), f"{len(src[1])} images of {src[0]} ({part})", own


def _evaluate(model: nn.Module, dataset: Any, meta: dict[str, Any], o: QuantizeOptions) -> dict[str, Any]:
    from rsedge.trainer.stage import evaluate_model
    from rsedge.trainer.tasks import task_for

    result = evaluate_model(model, dataset, meta, o.device, o.batch_size, o.workers, progress=o.progress, log=None)
    model.cpu()
    return task_for(meta).record_result(result)


def quantize_run(model_file: str | Path, out: str | Path, options: QuantizeOptions | None = None, *,
                 log: Callable[[str], None] = print, **fields: Any) -> dict[str, Any]:
    """The `quantize` stage: the model file's weights to fixed point, saved with int8 tensors,
    with record.json (per tensor), msb_histograms.png and, with `data`, the task's metrics
    before and after; returns the record."""
    from rsedge.trainer.modelfile import derive_meta, load_model, save_model
    from rsedge.trainer.stage import RunDirKind, Stage, build_options
    from rsedge.trainer.tasks import task_for

    o = build_options(QuantizeOptions, options, fields)
    msb = o.msb()
    model, meta = load_model(model_file)
    check_not_quantized(meta, "quantize")
    stage = Stage("quantize", out, exist_ok=o.exist_ok, progress=o.progress, log=log,
                  kind=RunDirKind("a run", QUANTIZE_RUN_FILES, resumable=False))
    dataset, described, own_split = evaluation_set(meta, o.data) if o.data is not None else (None, None, False)
    before = _evaluate(model, dataset, meta, o) if dataset is not None else None
    float_memory = weight_memory(model)
    model, record = msb_quantize_model(model, options=msb)
    after = _evaluate(model, dataset, meta, o) if dataset is not None else None
    quant = quantization_meta(record)
    source = str(Path(model_file).resolve())
    task = task_for(meta)
    metrics = ({task.metric_key("test"): after[task.primary_metric]}
               if after is not None and own_split else {})
    new_meta = derive_meta(meta, "quantize", history_entry={"scheme": SCHEME, "bits": msb.bits, "window": msb.window,
                                                            "biases": msb.biases, "source": source},
                           quantization=quant, metrics=metrics)
    path = save_model(stage.model_path, model, new_meta)
    plot = plot_msb_histograms(record, stage.out / PLOT_NAME, o.plot_layers) if o.plot_layers else None
    result = {
        "inputs": {"model": source, "data": str(o.data) if o.data is not None else None},
        "parameters": {"scheme": o.scheme, "bits": msb.bits, "window": msb.window, "biases": msb.biases},
        "summary": summarize(record),
        "memory": {"float": float_memory, "quantized": weight_memory(model, quant),
                   "file_bytes": path.stat().st_size},
        "evaluation": {"images": described, "before": before, "after": after} if before is not None else None,
        "layers": record["layers"],
        "outputs": {"model": path.name, "plot": plot.name if plot else None},
    }
    stage.record(result)
    return result


def format_summary(result: dict[str, Any], primary: str | None = None) -> str:
    """The short table `rsedge quantize` prints."""
    s, mem, p = result["summary"], result["memory"], result["parameters"]
    before, after = mem["float"], mem["quantized"]
    lines = [
        f"tensors quantized  {s['tensors']} ({p['bits']}-bit {p['scheme']}, window {p['window']}"
        f"{', biases too' if p['biases'] else ', biases float'})",
        f"underflow          mean {100 * s['mean_underflow']:.2f} %, max {100 * s['max_underflow']:.2f} % "
        f"({s['max_underflow_tensor']})",
        f"saturation         mean {100 * s['mean_saturated']:.3f} %, max {100 * s['max_saturated']:.3f} % "
        f"({s['max_saturated_tensor']})",
        f"weight memory      {before['mb']:.3f} MB -> {after['mb']:.3f} MB ({before['bytes'] / after['bytes']:.2f}x "
        f"less), {after['params'] / 1e6:.3f} M params",
    ]
    ev = result.get("evaluation")
    if ev and primary:
        lines.append(f"{primary:<18} {ev['before'][primary]:.4f} -> {ev['after'][primary]:.4f} on {ev['images']}")
    return "\n".join(lines)
