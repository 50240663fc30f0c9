"""Small models shared by the pruning-method tests."""

import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """conv(1->4, 3x3) -> relu -> flatten -> fc1(64->hidden) -> relu -> fc2(hidden->4).
    Input ``[B, 1, 6, 6]``."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.conv(x)).flatten(1))))
