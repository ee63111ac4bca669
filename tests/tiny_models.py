"""Small networks the pruning tests share (this file holds no tests)."""
import torch
from torch import nn


class Tiny(nn.Module):
    """conv-bn-relu twice, global average pool, linear: two prunable layers with BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def randomized(arch, classes=5, seed=0):
    """A fresh registry model in eval mode with non-trivial BatchNorm statistics and shifts, so a
    wrong slice or a lost channel cannot hide behind BatchNorm's identity initialization."""
    from rsedge.trainer.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, classes).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.2, 1.0, generator=g)
            m.bias.data.uniform_(-0.5, 0.5, generator=g)
    return model
