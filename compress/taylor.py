"""First-order Taylor filter importance (seed 002, eq. 8): Phi(W) = |mean_m dL/dw_m * w_m|.

Gradients are taken with the model in eval mode: in training mode a BatchNorm after the conv
makes the loss invariant to the filter's scale, so sum_m dL/dw_m * w_m is exactly zero for every
filter and the criterion would rank noise. Phi is computed per batch and averaged over the
batches of the training split (the paper accumulates it over mini-batches of its training set).

L is the task's own loss (`Task.loss`: cross-entropy for classification), as Torch-Pruning's
Taylor importance reads the gradients of whatever loss the user backpropagated.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import nn

LossFn = Callable[[Any, Any, Any], torch.Tensor]


def default_loss() -> LossFn:
    """The loss of the classification task, for callers that name none."""
    from rsedge.trainer.tasks import get_task

    return get_task("classification").loss


def taylor_scores(
    model: nn.Module,
    batches: Iterable,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    loss: LossFn | None = None,
) -> dict[nn.Module, torch.Tensor]:
    """Phi per output channel of every conv and linear layer; `batches` yield (inputs, targets)
    and `loss(outputs, targets, inputs)` is the scalar differentiated (default: cross-entropy):
    any task's targets (class indices, masks (N, H, W) with an ignore label...). A batch whose
    loss is not finite (a per-pixel cross-entropy over a batch with no labelled pixel is NaN) is
    skipped rather than turning every score into NaN."""
    from rsedge.trainer.train import to_device

    loss_fn = loss or default_loss()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    acc = {m: torch.zeros(m.weight.shape[0], dtype=torch.float64) for m in layers}
    was_training = model.training
    grads_before = {p: p.requires_grad for p in model.parameters()}
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="taylor scores", unit="batch", leave=False,
                  total=max_batches if max_batches else None)
    n = seen = 0
    try:
        for x, y in it:
            if max_batches is not None and seen >= max_batches:
                break
            seen += 1
            model.zero_grad(set_to_none=True)
            x, y = to_device(x, device), to_device(y, device)
            value = loss_fn(model(x), y, x)
            if not torch.isfinite(value):  # e.g. a mask batch whose every pixel is the ignore label
                continue
            value.backward()
            for m in layers:
                if m.weight.grad is not None:
                    phi = (m.weight.grad * m.weight).detach().flatten(1).mean(1).abs()
                    acc[m] += phi.double().cpu()
            n += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p, req in grads_before.items():
            p.requires_grad_(req)
        model.train(was_training)
    if n == 0:
        why = f" ({seen} batch(es) gave no finite loss: every target ignored?)" if seen else ""
        raise ValueError(f"Taylor scores need at least one batch of training images{why}")
    return {m: (v / n).float() for m, v in acc.items()}
