"""First-order Taylor filter importance (seed 002, eq. 8): Phi(W) = |mean_m dL/dw_m * w_m|.

Gradients are taken with the model in eval mode: in training mode a BatchNorm after the conv
makes the loss invariant to the filter's scale, so sum_m dL/dw_m * w_m is exactly zero for every
filter and the criterion would rank noise. Phi is computed per batch and averaged over the
batches of the training split (the paper accumulates it over mini-batches of its training set).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def taylor_scores(
    model: nn.Module,
    batches: Iterable,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[nn.Module, torch.Tensor]:
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
    n = 0
    try:
        for x, y in it:
            if max_batches is not None and n >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
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
        raise ValueError("Taylor scores need at least one batch of training images")
    return {m: (v / n).float() for m, v in acc.items()}
