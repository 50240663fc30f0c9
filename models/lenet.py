"""The two LeNets of Han et al. 2015 (Table 1), as in Caffe's examples.

- `LeNet300100`: fully connected 784-300-100-10 with ReLU (LeCun et al. 1998). 266,200 weights plus
  410 biases = 266,610 parameters; the paper's Table 1 rounds this to 267K.
- `LeNet5`: Caffe's LeNet-5: conv 20@5x5 -> maxpool 2 -> conv 50@5x5 -> maxpool 2 -> FC 500 -> ReLU
  -> FC 10. 430,500 weights plus 580 biases = 431,080 parameters; the paper's 431K.

Both are built from standard `nn.Linear` / `nn.Conv2d` / `nn.Dropout` layers, so a dense checkpoint
is an ordinary PyTorch model; `build_model(name, sparse=True)` swaps them for sparsekern's masked
layers with `sparsekern.nn.sparsify` (weights kept, masks all True). Layer names are the paper's
(fc1, fc2, fc3 / conv1, conv2, fc1, fc2) so reports line up with Table 2.

Dropout: Han et al.'s LeNets (Caffe) have none, so the default is p = 0. With p > 0 a dropout layer
sits on the input of each hidden FC layer after the first (the hidden activations); the pruning
script shrinks it with D_r = D_o sqrt(C_r / C_o) as the connections are pruned.
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet300100(nn.Module):
    """784-300-100-10 MLP. Input `[B, 1, 28, 28]` (or `[B, 784]`) -> logits `[B, 10]`."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)
        # drop1 acts on fc2's input (fc1's 300 outputs), drop2 on fc3's input (fc2's 100 outputs)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # [B, 784]
        x = torch.relu(self.fc1(x))  # [B, 300]
        x = torch.relu(self.fc2(self.drop1(x)))  # [B, 100]
        return self.fc3(self.drop2(x))  # [B, 10]


class LeNet5(nn.Module):
    """Caffe's LeNet-5. Input `[B, 1, 28, 28]` -> logits `[B, 10]`.

    Shapes: conv1 -> [B, 20, 24, 24] -> pool -> [B, 20, 12, 12] -> conv2 -> [B, 50, 8, 8] -> pool
    -> [B, 50, 4, 4] -> flatten [B, 800] -> fc1 [B, 500] -> ReLU -> fc2 [B, 10]. As in Caffe
    there is no non-linearity after the convolutions (max-pooling is the only one there).
    """

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)
        self.drop1 = nn.Dropout(dropout)  # on fc2's input (fc1's 500 outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.conv1(x), 2)  # [B, 20, 12, 12]
        x = nn.functional.max_pool2d(self.conv2(x), 2)  # [B, 50, 4, 4]
        x = torch.relu(self.fc1(x.flatten(1)))  # [B, 500]
        return self.fc2(self.drop1(x))  # [B, 10]


MODELS = {"lenet300": LeNet300100, "lenet5": LeNet5}

# Which dropout layer sits on the input of which layer: the pruning script scales each one with the
# connection count of the layer it feeds (Han et al. Sec 3.2: D_r = D_o sqrt(C_ir / C_io)).
DROPOUT_FEEDS = {
    "lenet300": {"drop1": "fc2", "drop2": "fc3"},
    "lenet5": {"drop1": "fc2"},
}


def build_model(name: str, sparse: bool = True, dropout: float = 0.0) -> nn.Module:
    """`name` in {"lenet300", "lenet5"}. With `sparse`, Linear/Conv2d become sparsekern's masked
    layers (all-True masks), which is what the pruning code works on."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    model = MODELS[name](dropout=dropout)
    if sparse:
        from sparsekern.nn import sparsify

        sparsify(model)
    return model


def count_weights(model: nn.Module) -> tuple[int, int]:
    """(weights, biases) of the Linear/Conv2d layers: the paper counts weights only."""
    w = b = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w += m.weight.numel()
            b += 0 if m.bias is None else m.bias.numel()
    return w, b
