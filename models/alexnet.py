"""AlexNet, as torchvision ships it and as Han et al. 2015 pruned it (Caffe's bvlc_alexnet).

Two architectures, because they differ in what pruning results depend on (the number of weights
per layer, and so every kept-% and compression figure):

| | torchvision `alexnet` ("one weird trick", Krizhevsky 2014) | Caffe `bvlc_alexnet` (Han's) |
| --- | --- | --- |
| conv channels | 64-192-384-256-256 | 96-256-384-384-256 |
| conv1 | 11x11 stride 4 pad 2, input 224 | 11x11 stride 4 pad 0, input 227 |
| groups | none | conv2, conv4, conv5 in 2 groups (the two GPUs of 2012) |
| normalisation | none | LRN (size 5, alpha 1e-4, beta 0.75) after conv1 and conv2 |
| weights | 61,090,496 (conv 2.47M, fc 58.6M) | 60,954,656 (conv 2.33M, fc 58.6M): Han's 61M |
| parameters | 61,100,840 | 60,965,224 |

Layer names: torchvision's model keeps torchvision's names (`features.0`, `classifier.6`, ...) so
its pretrained state dict (`alexnet-owt-7be5be79.pth`) loads as is; `CaffeAlexNet` uses Caffe's
names (`conv1` ... `conv5`, `fc6` ... `fc8`, Han's Table 4). `PAPER_LAYERS` lists the paper's
names in execution order for both (see `models.paper_layer_names`).

Small images: torchvision's AlexNet ends its features with `AdaptiveAvgPool2d((6, 6))`, but its
three 3x3/stride-2 max-pools need at least 63x63 inputs (at 32x32 the last pool sees a 1x1 map
and fails); `CaffeAlexNet` needs 67x67 (no padding in conv1). `MIN_INPUT` records this; the
synthetic mode of `scripts/prune_imagenet.py` uses 64 / 72 px.

`width` (default 1) scales every channel count and the FC hidden size: `width=1/16` is the
CPU-sized model of the tiny test configuration, with the same layers, names and kinds.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

# The paper's layer names (Table 4), in execution order.
PAPER_LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
# Smallest square input each variant accepts (see the module docstring).
MIN_INPUT = {"alexnet": 63, "alexnet-caffe": 67}


def _w(n: int, width: float) -> int:
    """A channel count scaled by `width`, at least 1 (at least 2 for grouped layers: even)."""
    return max(2, 2 * round(n * width / 2))


def alexnet(num_classes: int = 1000, width: float = 1.0, dropout: float = 0.5) -> nn.Module:
    """torchvision's AlexNet. Input `[B, 3, H, W]` (H, W >= 63; 224 for ImageNet) -> `[B, classes]`.

    `width == 1` returns `torchvision.models.alexnet(weights=None, ...)` itself; otherwise the
    same model with its conv channels and FC hidden size scaled (same module names)."""
    if width == 1.0:
        return torchvision.models.alexnet(weights=None, num_classes=num_classes, dropout=dropout)
    with torch.device("meta"):  # every layer with parameters is replaced below: skip its init
        model = torchvision.models.alexnet(weights=None, num_classes=num_classes, dropout=dropout)
    c = [_w(n, width) for n in (64, 192, 384, 256, 256)]
    hidden = _w(4096, width)
    f = model.features  # indices of the convs in torchvision's Sequential: 0, 3, 6, 8, 10
    f[0] = nn.Conv2d(3, c[0], kernel_size=11, stride=4, padding=2)
    f[3] = nn.Conv2d(c[0], c[1], kernel_size=5, padding=2)
    f[6] = nn.Conv2d(c[1], c[2], kernel_size=3, padding=1)
    f[8] = nn.Conv2d(c[2], c[3], kernel_size=3, padding=1)
    f[10] = nn.Conv2d(c[3], c[4], kernel_size=3, padding=1)
    k = model.classifier  # Linear at 1, 4, 6
    k[1] = nn.Linear(c[4] * 6 * 6, hidden)
    k[4] = nn.Linear(hidden, hidden)
    k[6] = nn.Linear(hidden, num_classes)
    assert not any(t.is_meta for t in model.state_dict().values())
    return model


class CaffeAlexNet(nn.Module):
    """Caffe's bvlc_alexnet (Krizhevsky et al. 2012), the network of Han et al.'s Table 4.

    Input `[B, 3, 227, 227]` -> logits `[B, num_classes]`. Shapes at 227 (width 1):
    conv1 96@11x11/4 -> [B, 96, 55, 55] -> ReLU -> LRN -> pool 3/2 -> [B, 96, 27, 27];
    conv2 256@5x5 pad 2, 2 groups -> [B, 256, 27, 27] -> ReLU -> LRN -> pool -> [B, 256, 13, 13];
    conv3 384@3x3 pad 1 -> conv4 384@3x3 pad 1, 2 groups -> conv5 256@3x3 pad 1, 2 groups (each
    + ReLU) -> pool -> [B, 256, 6, 6] -> (adaptive avg-pool to 6x6: identity at 227, lets other
    sizes through) -> flatten [B, 9216] -> fc6 4096 -> ReLU -> dropout -> fc7 4096 -> ReLU ->
    dropout -> fc8. Dropout before fc7 and fc8 as in Caffe (after relu6 / relu7).
    """

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.5):
        super().__init__()
        c = [_w(n, width) for n in (96, 256, 384, 384, 256)]
        hidden = _w(4096, width)
        self.conv1 = nn.Conv2d(3, c[0], kernel_size=11, stride=4)
        self.conv2 = nn.Conv2d(c[0], c[1], kernel_size=5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(c[1], c[2], kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(c[2], c[3], kernel_size=3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(c[3], c[4], kernel_size=3, padding=1, groups=2)
        # Caffe's LRN: local_size 5, alpha 1e-4, beta 0.75, k 1 (PyTorch divides alpha by size
        # as Caffe does in ACROSS_CHANNELS mode)
        self.norm1 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        self.norm2 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.fc6 = nn.Linear(c[4] * 6 * 6, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, num_classes)
        self.drop6 = nn.Dropout(dropout)  # on fc7's input
        self.drop7 = nn.Dropout(dropout)  # on fc8's input
        # bvlc_alexnet's train_val.prototxt initialisation: gaussian std 0.01 (0.005 for fc6 and
        # fc7); biases 0.1 for conv2, conv4, conv5, fc6, fc7, else 0
        for name, m in self.named_children():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, std=0.005 if name in ("fc6", "fc7") else 0.01)
                one = name in ("conv2", "conv4", "conv5", "fc6", "fc7")
                nn.init.constant_(m.bias, 0.1 if one else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.norm1(torch.relu(self.conv1(x))))  # [B, 96, 27, 27]
        x = self.pool(self.norm2(torch.relu(self.conv2(x))))  # [B, 256, 13, 13]
        x = torch.relu(self.conv3(x))  # [B, 384, 13, 13]
        x = torch.relu(self.conv4(x))  # [B, 384, 13, 13]
        x = self.pool(torch.relu(self.conv5(x)))  # [B, 256, 6, 6]
        x = self.avgpool(x).flatten(1)  # [B, 9216]
        x = torch.relu(self.fc6(x))  # [B, 4096]
        x = torch.relu(self.fc7(self.drop6(x)))  # [B, 4096]
        return self.fc8(self.drop7(x))  # [B, num_classes]


def alexnet_caffe(num_classes: int = 1000, width: float = 1.0, dropout: float = 0.5) -> nn.Module:
    return CaffeAlexNet(num_classes=num_classes, width=width, dropout=dropout)
