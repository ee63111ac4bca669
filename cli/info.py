"""`rsedge info` (a short summary of a model file) and `rsedge models` (the registry with its
costs): what a user checks before spending a training or a flight on a model."""
from __future__ import annotations

import json
import os
from typing import Any

SHOWN_LAYERS = 12


def _fmt_value(key: str, v: Any) -> str:
    if key in ("source", "kd_from") and isinstance(v, str):
        return os.path.basename(os.path.dirname(v)) + "/" + os.path.basename(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _history_lines(history: list[dict[str, Any]]) -> list[str]:
    lines = []
    for i, h in enumerate(history, 1):
        rest = ", ".join(f"{k}={_fmt_value(k, v)}" for k, v in h.items() if k != "stage")
        lines.append(f"  {i}. {h.get('stage', '?'):<13}{rest}")
    return lines


def _width_changes(model, reference) -> list[tuple[str, int, int]]:
    from rsedge.compress.slim import conv_widths

    now, before = conv_widths(model), conv_widths(reference)
    return [(n, c0, now[n]) for n, c0 in before.items() if n in now and now[n] != c0]


def _weights_line(model, meta: dict[str, Any]) -> str:
    """What the weights occupy (seed 002's "memory"): fixed point where the model is quantized."""
    from rsedge.compress.msb_fixed import weight_memory

    quant = meta.get("quantization")
    mem = weight_memory(model, quant)
    if not quant:
        return f"weights       {mem['mb']:.2f} MB, float32"
    return (f"weights       {mem['mb']:.2f} MB: {mem['quantized_params']:,} params in {quant.get('bits')}-bit fixed "
            f"point ({quant.get('scheme')}), {mem['float_params']:,} float32 (normalization, float biases)")


def info_summary(path: str, all_layers: bool = False) -> str:
    """Architecture, task, classes, input, params and MACs (against the unpruned architecture),
    file size, the layers whose width changed, the history of stages and the metrics."""
    import torch

    from rsedge.compress.counting import count_macs, count_params
    from rsedge.trainer.modelfile import load_model
    from rsedge.trainer.models import create_model

    model, meta = load_model(path)
    size = list(meta["input_size"])
    classes = list(meta["classes"])
    with torch.device("meta"):
        reference = create_model(meta["arch"], len(classes), **meta.get("model_args", {}))
    params, macs = count_params(model), count_macs(model, size)
    ref_params, ref_macs = count_params(reference), count_macs(reference, size)
    norm = meta.get("normalization", {})
    shown = ", ".join(classes[:10]) + (f", ... ({len(classes) - 10} more)" if len(classes) > 10 else "")
    lines = [
        f"model file    {path} ({os.path.getsize(path) / 1e6:.2f} MB)",
        f"architecture  {meta['arch']}, {meta.get('task', 'classification')}",
        f"classes       {len(classes)}: {shown}",
        f"input         3x{size[0]}x{size[1]}, mean {_fmt_value('', norm.get('mean'))}, "
        f"std {_fmt_value('', norm.get('std'))}",
        f"params        {params:,} ({params / ref_params:.1%} of the unpruned {meta['arch']}: {ref_params:,})",
        f"MACs          {macs:,} at {size[0]}x{size[1]} ({macs / ref_macs:.1%} of {ref_macs:,})",
        _weights_line(model, meta),
    ]
    changed = _width_changes(model, reference)
    if changed:
        lines.append(f"pruned layers {len(changed)} conv/linear layer(s) changed width (before -> after):")
        width = max(len(n) for n, _, _ in changed)
        for n, c0, c1 in changed if all_layers else changed[:SHOWN_LAYERS]:
            lines.append(f"  {n:<{width}}  {c0} -> {c1}")
        if not all_layers and len(changed) > SHOWN_LAYERS:
            lines.append(f"  ... and {len(changed) - SHOWN_LAYERS} more (--layout lists them all)")
    else:
        lines.append("pruned layers none: every layer has the architecture's width")
    graph = meta.get("layout", {}).get("graph") or {}
    if graph:
        lines.append(f"residual adds {len(graph)} rewritten by --coupling reconstruct (IndexedAdd)")
    lines.append("history")
    lines += _history_lines(meta.get("history", [])) or ["  (none)"]
    metrics = meta.get("metrics") or {}
    lines.append("metrics       " + (", ".join(f"{k} {_fmt_value(k, v)}" for k, v in metrics.items()) or "(none)"))
    return "\n".join(lines)


def info_json(path: str, layout: bool = False) -> str:
    from rsedge.trainer.modelfile import read_metadata

    meta = read_metadata(path)
    if not layout:
        meta["layout"] = {k: f"{len(v)} entries" for k, v in meta.get("layout", {}).items()}
    return json.dumps(meta, indent=2)


def models_table(img_size: int, num_classes: int) -> str:
    """Every registry architecture with its parameters and MACs, computed (meta device)."""
    from rsedge.compress.counting import architecture_counts
    from rsedge.trainer.models import list_models

    rows = [(name, architecture_counts(name, num_classes, (img_size, img_size))) for name in list_models()]
    width = max(len(n) for n, _ in rows)
    head = f"{'model':<{width}}  {'params':>12}  {'MACs':>15}"
    lines = [f"params and MACs at {img_size}x{img_size} input, {num_classes} classes "
             "(MACs: convolutions and linear layers)", head]
    lines += [f"{n:<{width}}  {c['params']:>12,}  {c['macs']:>15,}" for n, c in rows]
    return "\n".join(lines)
