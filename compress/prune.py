"""Structured channel pruning, physically slimmed: the pruned channels are removed from the
weights, so the saved model, its ONNX and its engine are smaller and faster.

Torch-Pruning's dependency graph decides which layers are coupled (a residual add, a depthwise
conv, the head); our criteria score the channels; kept counts are rounded to a multiple of
`round_to` (rounded *down*: Torch-Pruning keeps `floor(kept / round_to) * round_to`, never fewer
than `round_to`) because TensorRT kernels and tensor cores run best on multiples of 8.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rsedge.trainer.modelfile import derive_meta, load_model, save_model
from rsedge.trainer.records import write_record

from .counting import count_macs, count_params
from .importance import get_criterion

METHODS = ("l1", "bn-scale")


def _conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def classifier_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Layers whose outputs are the class scores: never pruned."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def prune_model(
    model: nn.Module,
    input_size: Sequence[int],
    num_classes: int,
    method: str = "l1",
    ratio: float = 0.5,
    round_to: int | None = 8,
    global_pruning: bool = False,
    ignored: Sequence[nn.Module] = (),
) -> dict[str, Any]:
    """Prune `model` in place; returns the per-layer table and the counts before and after."""
    import torch_pruning as tp

    if not 0 < ratio < 1:
        raise ValueError(f"--ratio must be between 0 and 1 (fraction of channels removed), not {ratio}")
    model.eval()
    example = torch.zeros(1, 3, *input_size)
    before_w = _conv_widths(model)
    before = {"params": count_params(model), "macs": count_macs(model, input_size)}
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=get_criterion(method),
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        ignored_layers=list(classifier_layers(model, num_classes)) + list(ignored),
        round_to=round_to if round_to and round_to > 1 else None,
    )
    pruner.step()
    after_w = _conv_widths(model)
    after = {"params": count_params(model), "macs": count_macs(model, input_size)}
    layers = [
        {
            "layer": name,
            "channels_before": before_w[name],
            "channels_after": after_w.get(name),
            "achieved_ratio": round(1 - after_w.get(name, 0) / before_w[name], 4),
        }
        for name in before_w
    ]
    return {
        "method": method,
        "requested_ratio": ratio,
        "round_to": round_to,
        "global": global_pruning,
        "before": before,
        "after": after,
        "params_ratio": after["params"] / before["params"],
        "macs_ratio": after["macs"] / before["macs"],
        "layers": layers,
    }


def prune_run(
    model_file: str | Path,
    out: str | Path,
    method: str = "l1",
    ratio: float = 0.5,
    round_to: int | None = 8,
    global_pruning: bool = False,
    data: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(model_file)
    report = prune_model(model, meta["input_size"], len(meta["classes"]), method, ratio, round_to, global_pruning)
    log(
        f"pruned with {method} at ratio {ratio}: params {report['before']['params']:,} -> {report['after']['params']:,}"
        f" ({report['params_ratio']:.1%}), MACs {report['before']['macs']:,} -> {report['after']['macs']:,}"
        f" ({report['macs_ratio']:.1%})"
    )
    evaluation = None
    if data is not None:

        evaluation = eval_run_quiet(out, data, model, meta, log)
    new_meta = derive_meta(
        meta,
        "prune",
        history_entry={"method": method, "ratio": ratio, "round_to": round_to, "global": global_pruning,
                       "source": str(Path(model_file).resolve())},
        metrics={"val_top1_before_finetune": evaluation} if evaluation is not None else {},
    )
    path = save_model(out / "model.safetensors", model, new_meta)
    write_record(
        out,
        "prune",
        {
            "inputs": {"model": str(Path(model_file).resolve()), "data": str(data) if data else None},
            "parameters": {"method": method, "ratio": ratio, "round_to": round_to, "global": global_pruning},
            **report,
            "val_top1_before_finetune": evaluation,
            "outputs": {"model": path.name},
        },
    )
    return report


def eval_run_quiet(out: Path, data, model: nn.Module, meta: dict[str, Any], log) -> float | None:
    """Validation accuracy right after pruning (before fine-tuning), when the model's split is at hand."""
    from rsedge.trainer.datasets import ImageListDataset, load_split
    from rsedge.trainer.train import evaluate
    from rsedge.trainer.transforms import eval_transform

    if not meta.get("split") or not Path(meta["split"]).is_file():
        log("no split file for this model: skipping the accuracy check after pruning")
        return None
    split = load_split(meta["split"])
    if Path(split["root"]) != Path(data).resolve():
        log(f"--data {data} is not the folder this model was trained on: skipping the accuracy check")
        return None
    ds = ImageListDataset(split["root"], split["val"], eval_transform(meta["input_size"], **meta["normalization"]))
    acc = evaluate(model, ds, meta["classes"])["top1"]
    log(f"validation top-1 right after pruning: {acc:.4f}")
    return acc
