"""RemoteTrimmer's Channel Attention Pruning (seed 000, eqs. 1-2) as the paper runs it.

"First, we apply the SENet module to ResNet18 and train the network": an SE-augmented copy of
the network trains (all weights, `CapOptions.epochs`), the attention s = sigmoid(W2 ReLU(W1
AvgPool(X))) is averaged over a sample set (s_bar), and the importance of a channel is
s_bar * |gamma| with gamma the trained BatchNorm scale. The attention is then folded into the
BatchNorm (gamma and beta times s_bar) and the probes removed, so the model that is pruned and
saved carries no SE block and computes what the SE network computed with s at its mean.

torchvision's classifiers have no SE block, so a probe is attached to a BatchNorm by a forward
hook. Where the probes sit:
- on every affine BatchNorm2d except those of a shortcut branch (a module path with a
  `downsample` or `shortcut` part: SE-ResNet recalibrates the residual branch, not the
  projection);
- a probe *reads* the map after the activation the BatchNorm feeds (ReLU, ReLU6, SiLU...) when
  the BatchNorm's only consumer is one, else the BatchNorm's output (a residual branch's last
  BatchNorm, before the add, as in SE-ResNet); it *scales* the BatchNorm's output, which is the
  same as scaling after a ReLU (s > 0) and exactly what folding s_bar into gamma and beta
  reproduces.

Probes start as SENet's do (PyTorch's default Linear initialization, s near 0.5): the network
adapts to them while it trains. With `train_model=False` only the probes learn, on a frozen
network: cheaper, but on a trained network their attention stays nearly constant (measured on
EuroSAT: per-layer coefficient of variation 0.8 %), so CAP then ranks almost as |gamma| does.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .taylor import LossFn, default_loss

SHORTCUT_PARTS = ("downsample", "shortcut")
_ACT_MODULES: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {
    nn.ReLU: F.relu, nn.ReLU6: F.relu6, nn.SiLU: F.silu, nn.Hardswish: F.hardswish, nn.GELU: F.gelu,
    nn.Mish: F.mish, nn.Hardsigmoid: F.hardsigmoid, nn.Sigmoid: torch.sigmoid,
}
_ACT_FUNCTIONS = {F.relu: F.relu, torch.relu: F.relu, F.relu6: F.relu6, F.silu: F.silu, F.hardswish: F.hardswish,
                  F.gelu: F.gelu, torch.sigmoid: torch.sigmoid}


@dataclass
class CapOptions:
    """How the SE-augmented network is trained and read."""

    epochs: int = 2
    lr: float = 1e-3  # Adam, over the probes and (train_model) the network
    train_model: bool = True  # the paper: the network trains with its SE modules
    seed: int = 0
    progress: bool = False


class SEProbe(nn.Module):
    """Eq. 1's squeeze-and-excitation: reduction 16 (at least 4 hidden units), SENet's init."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))


def attention_batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorms that get a probe: affine, not on a shortcut branch."""
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and m.affine and not set(name.split(".")) & set(SHORTCUT_PARTS)]


def following_activations(model: nn.Module, bns: Sequence[nn.Module]) -> dict[nn.Module, Callable | None]:
    """Per BatchNorm, the activation function its only consumer applies, or None (several
    consumers, no activation, or a model torch.fx cannot trace)."""
    from rsedge.trainer.modelfile import trace

    found: dict[nn.Module, Callable | None] = {bn: None for bn in bns}
    try:
        gm = trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model: every probe reads the BatchNorm's output
        return found
    wanted = {id(bn): bn for bn in bns}
    for node in gm.graph.nodes:
        if node.op != "call_module" or id(gm.get_submodule(node.target)) not in wanted or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        act = None
        if user.op == "call_module":
            act = _ACT_MODULES.get(type(gm.get_submodule(user.target)))
        elif user.op in ("call_function", "call_method"):
            act = _ACT_FUNCTIONS.get(user.target) or ({"relu": F.relu, "sigmoid": torch.sigmoid}.get(user.target)
                                                      if user.op == "call_method" else None)
        found[wanted[id(gm.get_submodule(node.target))]] = act
    return found


def _train_probes(model: nn.Module, params: list[nn.Parameter], train_batches: Iterable, loss_fn: LossFn,
                  o: CapOptions, device) -> list[float]:
    """The SE-augmented network's training loop (its hooks are in place); the losses seen."""
    from rsedge.trainer.train import to_device

    opt = torch.optim.Adam(params, lr=o.lr)
    losses: list[float] = []
    for epoch in range(o.epochs):
        model.train(o.train_model)
        it = train_batches
        if o.progress:
            from tqdm import tqdm

            it = tqdm(train_batches, desc=f"CAP: SE network {epoch + 1}/{o.epochs}", unit="batch", leave=False)
        for x, y in it:
            x, y = to_device(x, device), to_device(y, device)
            value = loss_fn(model(x), y, x)
            if not torch.isfinite(value):  # no labelled target in the batch: nothing to learn from
                continue
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            losses.append(value.item())
    return losses


def channel_attention(
    model: nn.Module,
    bns: Sequence[nn.BatchNorm2d],
    train_batches: Iterable,
    sample_batches: Iterable,
    options: CapOptions | None = None,
    device: torch.device | str = "cpu",
    probes: dict[nn.BatchNorm2d, SEProbe] | None = None,
    loss: LossFn | None = None,
) -> tuple[dict[nn.BatchNorm2d, torch.Tensor], dict[str, object]]:
    """s_bar per BatchNorm and a summary. `train_batches` is iterated once per epoch ((images,
    targets)); the SE network minimizes the task's `loss(outputs, targets, images)` (default:
    cross-entropy); `sample_batches` give the images s is averaged over. With `train_model` the
    network's weights change: call `fold_attention` once the scores are taken."""
    o = options or CapOptions()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o.seed)
        probes = probes or {bn: SEProbe(bn.num_features) for bn in bns}
    for p in probes.values():
        p.to(device)
    acts = following_activations(model, bns)
    collect: dict[nn.BatchNorm2d, list[torch.Tensor]] | None = None

    def hook(bn):
        act = acts.get(bn)

        def fn(mod, args, out):
            s = probes[bn](act(out) if act is not None else out)
            if collect is not None:
                collect[bn].append(s.detach().double().sum(0).cpu())
            return out * s[:, :, None, None]
        return fn

    model.to(device)
    handles = [bn.register_forward_hook(hook(bn)) for bn in bns]
    req = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(o.train_model)
        params = [p for pr in probes.values() for p in pr.parameters()]
        params += list(model.parameters()) if o.train_model else []
        losses = _train_probes(model, params, train_batches, loss or default_loss(), o, device)
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
    summary = {"probes": len(probes), "epochs": o.epochs, "train_model": o.train_model, "samples": count,
               "probes_after_activation": sum(acts.get(bn) is not None for bn in bns),
               "final_loss": losses[-1] if losses else None, **attention_spread(s_bar)}
    return s_bar, summary


def attention_spread(s_bar: dict[nn.Module, torch.Tensor]) -> dict[str, float]:
    """How much the attention tells channels apart: s_bar's range and its per-layer coefficient
    of variation (std / mean over a layer's channels), the mean and the smallest over layers."""
    all_s = torch.cat([s.flatten() for s in s_bar.values()]) if s_bar else torch.zeros(1)
    cvs = [float(s.std() / s.mean()) for s in s_bar.values() if s.numel() > 1 and float(s.mean()) > 0]
    return {"s_bar_mean": float(all_s.mean()), "s_bar_min": float(all_s.min()), "s_bar_max": float(all_s.max()),
            "s_bar_cv_mean": sum(cvs) / len(cvs) if cvs else 0.0, "s_bar_cv_min": min(cvs) if cvs else 0.0}


def overlap_with_gamma(s_bar: dict[nn.BatchNorm2d, torch.Tensor], ratio: float) -> float:
    """Jaccard index, pooled over layers, between the channels CAP's s_bar * |gamma| puts in each
    layer's lowest `ratio` and those |gamma| alone puts there: 1 means the attention changed no
    choice (CAP would be BN-scale with extra steps)."""
    inter = union = 0
    for bn, s in s_bar.items():
        k = int(ratio * s.numel())
        if k == 0:
            continue
        g = bn.weight.detach().abs().float().cpu()
        a = set(torch.argsort(s.cpu() * g)[:k].tolist())
        b = set(torch.argsort(g)[:k].tolist())
        inter += len(a & b)
        union += len(a | b)
    return inter / union if union else 1.0


@torch.no_grad()
def fold_attention(s_bar: dict[nn.BatchNorm2d, torch.Tensor]) -> None:
    """Replace each probe by its mean attention: gamma and beta times s_bar."""
    for bn, s in s_bar.items():
        bn.weight.mul_(s.to(bn.weight.device))
        bn.bias.mul_(s.to(bn.bias.device))
