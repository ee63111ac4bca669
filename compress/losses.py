"""Fine-tuning losses for pruned models."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def adaptive_mining_loss(logits: torch.Tensor, targets: torch.Tensor, r: float = 0.4) -> torch.Tensor:
    """RemoteTrimmer's Adaptive Mining Loss, L = r*CE + exp(d/N + (d/N)^2), averaged over the batch.

    d is a per-sample error; we read it as ||onehot(y) - softmax(z)||_1 (in [0, 2]) so it stays
    differentiable and grows with how wrong the sample is: hard samples get an exponentially
    larger share of the gradient. N is the number of classes, r = 0.4 was the paper's best."""
    n = logits.shape[1]
    ce = F.cross_entropy(logits, targets, reduction="none")
    d = (F.one_hot(targets, n).to(logits.dtype) - logits.softmax(1)).abs().sum(1)
    return (r * ce + torch.exp(d / n + (d / n) ** 2)).mean()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Logit distillation (Hinton et al., 2015): KL(softmax(t/T) || softmax(s/T)) * T^2, the T^2
    keeping its gradient on the scale of the hard-label loss whatever the temperature."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                    log_target=True) * t * t
