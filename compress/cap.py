"""RemoteTrimmer's Channel Attention Pruning (seed 000, eqs. 1-2): squeeze-and-excitation probes.

torchvision's classifiers have no SE block after their BatchNorms, so a probe
s = sigmoid(W2 ReLU(W1 AvgPool(X))) is attached to every BatchNorm by a forward hook that
multiplies the BatchNorm's output by s. The probes are trained briefly (the network frozen by
default, BatchNorm statistics included), then s is averaged over a sample set (s_bar) and the
hooks are removed: the model that is pruned and saved carries no probe.

Probes start close to identity (s ~ 0.95) so that the frozen network begins where it was and
the attention learns which channels to turn down, not how to undo a global halving.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .taylor import LossFn, default_loss


class SEProbe(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.constant_(self.fc2.bias, 3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))


def channel_attention(
    model: nn.Module,
    bns: Sequence[nn.BatchNorm2d],
    train_batches: Iterable,
    sample_batches: Iterable,
    epochs: int = 1,
    lr: float = 1e-3,
    train_model: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
    probes: dict[nn.BatchNorm2d, SEProbe] | None = None,
    loss: LossFn | None = None,
) -> tuple[dict[nn.BatchNorm2d, torch.Tensor], dict[str, float]]:
    """Returns s_bar per BatchNorm and a summary. `train_batches` is called once per epoch
    (an iterable of (images, targets)); the probes learn to minimize the task's
    `loss(outputs, targets, images)` (default: cross-entropy); `sample_batches` gives the images
    s is averaged over.
    With `train_model` the network trains with its probes; call `fold_attention` once the scores
    are taken so that the model without probes approximates the one that was trained."""
    from rsedge.trainer.train import to_device

    loss_fn = loss or default_loss()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probes = probes or {bn: SEProbe(bn.num_features) for bn in bns}
    for p in probes.values():
        p.to(device)
    collect: dict[nn.BatchNorm2d, list[torch.Tensor]] | None = None

    def hook(bn):
        def fn(mod, args, out):
            s = probes[bn](out)
            if collect is not None:
                collect[bn].append(s.detach().double().sum(0).cpu())
            return out * s[:, :, None, None]
        return fn

    model.to(device)
    handles = [bn.register_forward_hook(hook(bn)) for bn in bns]
    req = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    probe_params = [p for pr in probes.values() for p in pr.parameters()]
    losses = []
    try:
        for p in model.parameters():
            p.requires_grad_(train_model)
        params = probe_params + ([p for p in model.parameters()] if train_model else [])
        opt = torch.optim.Adam(params, lr=lr)
        for epoch in range(epochs):
            model.train(train_model)
            it = train_batches
            if progress:
                from tqdm import tqdm

                it = tqdm(train_batches, desc=f"CAP probes {epoch + 1}/{epochs}", unit="batch", leave=False)
            for x, y in it:
                x, y = to_device(x, device), to_device(y, device)
                value = loss_fn(model(x), y, x)
                if not torch.isfinite(value):  # no labelled target in the batch: nothing to learn from
                    continue
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                losses.append(value.item())
        model.eval()
        collect = {bn: [] for bn in bns}
        count = 0
        with torch.no_grad():
            for x, *_ in sample_batches:
                model(x.to(device))
                count += len(x)
        if count == 0:
            raise ValueError("channel attention needs at least one sample image")
        s_bar = {bn: (torch.stack(v).sum(0) / count).float() for bn, v in collect.items()}
    finally:
        for h in handles:
            h.remove()
        for p, r in req.items():
            p.requires_grad_(r)
        model.train(was_training)
    all_s = torch.cat(list(s_bar.values())) if s_bar else torch.zeros(1)
    summary = {"probes": len(probes), "epochs": epochs, "train_model": train_model, "samples": count,
               "final_loss": losses[-1] if losses else None, "s_bar_mean": float(all_s.mean()),
               "s_bar_min": float(all_s.min()), "s_bar_max": float(all_s.max())}
    return s_bar, summary


@torch.no_grad()
def fold_attention(s_bar: dict[nn.BatchNorm2d, torch.Tensor]) -> None:
    """Replace each probe by its mean attention: gamma and beta times s_bar."""
    for bn, s in s_bar.items():
        bn.weight.mul_(s.to(bn.weight.device))
        bn.bias.mul_(s.to(bn.bias.device))
