"""An exponential moving average of the weights (Polyak averaging), what detectors are evaluated
and shipped with: the averaged weights are steadier than the last step's and usually a point or
two of mAP better. The decay ramps up as d * (1 - exp(-updates / tau)), so the average follows
the raw weights closely in the first few thousand steps (a short CPU run ships almost the raw
weights) and averages over ~1 / (1 - d) steps once training is long.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

DECAY, TAU = 0.9999, 2000.0
PREFIX = "ema."


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = DECAY, tau: float = TAU, updates: int = 0):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay_max, self.tau, self.updates = decay, tau, int(updates)

    def decay(self) -> float:
        return self.decay_max * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay()
        current = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(current[name].detach().to(value.dtype), alpha=1 - d)
            else:
                value.copy_(current[name])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averaged state under `ema.` names: what a training checkpoint carries to resume it."""
        return {PREFIX + k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def restore(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        state = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        if state:
            self.module.load_state_dict(state)
        self.updates = int(updates)
