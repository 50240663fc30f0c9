"""VGG-16 (Simonyan and Zisserman 2014, configuration D), as torchvision ships it.

torchvision's `vgg16` is the network Han et al. 2015 pruned (Caffe's VGG_ILSVRC_16_layers has the
same 13 convs 3x3 pad 1 + 3 FC layers, no batch norm): 138,344,128 weights + 13,416 biases =
138,357,544 parameters (the paper's 138M); fc6 (25088 x 4096 = 102.8M) holds 74% of the weights.

Layer names are torchvision's (`features.0` ... `features.28`, `classifier.0/3/6`) so its
pretrained state dict (`vgg16-397923af.pth`) loads as is; `PAPER_LAYERS` gives the paper's names
(Table 5: conv1_1 ... conv5_3, fc6, fc7, fc8) in execution order.

Small images: the features end with five 2x2 max-pools, so inputs must be at least 32x32; the
`AdaptiveAvgPool2d((7, 7))` before the classifier then replicates the 1x1 map (at 224 px it is
the identity). `width` (default 1) scales every channel count and the FC hidden size (the tiny CPU
configuration uses 1/16; same layers, names and kinds).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

PAPER_LAYERS = [
    "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
    "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7", "fc8",
]  # fmt: skip
MIN_INPUT = {"vgg16": 32}
CFG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16(num_classes: int = 1000, width: float = 1.0, dropout: float = 0.5) -> nn.Module:
    """torchvision's VGG-16 (no batch norm). Input `[B, 3, H, W]` (H, W >= 32; 224 for ImageNet)
    -> `[B, num_classes]`. `width == 1` returns `torchvision.models.vgg16(weights=None, ...)`."""
    if width == 1.0:
        return torchvision.models.vgg16(weights=None, num_classes=num_classes, dropout=dropout)
    with torch.device("meta"):  # every layer with parameters is replaced below: skip its init
        model = torchvision.models.vgg16(weights=None, num_classes=num_classes, dropout=dropout)
    cfg = [v if v == "M" else max(1, round(v * width)) for v in CFG_D]
    hidden = max(1, round(4096 * width))
    model.features = torchvision.models.vgg.make_layers(cfg, batch_norm=False)
    k = model.classifier  # Linear at 0, 3, 6
    k[0] = nn.Linear(cfg[-2] * 7 * 7, hidden)
    k[3] = nn.Linear(hidden, hidden)
    k[6] = nn.Linear(hidden, num_classes)
    for m in model.modules():  # torchvision's VGG initialisation, for the replaced layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    assert not any(t.is_meta for t in model.state_dict().values())
    return model
