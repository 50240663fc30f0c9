"""Reference models for sparsekern's experiments: Han et al. 2015's LeNets (MNIST) and the ImageNet
networks it pruned, AlexNet (torchvision's and Caffe's) and VGG-16 (torchvision's)."""

from __future__ import annotations

import os

import torch
from torch import nn

from models import alexnet as _alexnet
from models import vgg as _vgg
from models.alexnet import CaffeAlexNet, alexnet, alexnet_caffe
from models.lenet import DROPOUT_FEEDS, MODELS, LeNet5, LeNet300100, build_model, count_weights
from models.paper import HAN_2015, METHOD_FIGURES
from models.vgg import vgg16

# name -> (constructor(num_classes, width, dropout), the paper's layer names in execution order,
# smallest square input, ImageNet crop size)
IMAGENET_MODELS = {
    "alexnet": (alexnet, _alexnet.PAPER_LAYERS, _alexnet.MIN_INPUT["alexnet"], 224),
    "alexnet-caffe": (alexnet_caffe, _alexnet.PAPER_LAYERS, _alexnet.MIN_INPUT["alexnet-caffe"],
                      227),
    "vgg16": (vgg16, _vgg.PAPER_LAYERS, _vgg.MIN_INPUT["vgg16"], 224),
}  # fmt: skip


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a local state dict file (e.g. torchvision's `alexnet-owt-7be5be79.pth`) into `model`,
    with `weights_only=True` (no code runs from the file) and `strict=True`. Also accepts a
    checkpoint dict that holds the state dict under `"model"` or `"state_dict"`.

    Raises `ValueError` naming the file and what differs (missing / unexpected keys, shapes)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code in it, not a torch file, ...
        raise ValueError(
            f"cannot read weights {path}: expected a torch state dict file ({e})"
        ) from None
    if isinstance(state, dict) and ("model" in state or "state_dict" in state):
        state = state.get("model", state.get("state_dict"))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights {path}: expected a dict of tensors, got {type(state).__name__}")
    own = model.state_dict()
    # masks are optional: a dense state dict loads into a sparsified model (masks stay all True)
    missing = [k for k in own if k not in state and not k.endswith(".mask")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: expected {tuple(own[k].shape)}, got {tuple(v.shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"weights {path} do not fit {type(model).__name__}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:5]}"
        )
    model.load_state_dict(state, strict=False)
    return model


def build_imagenet_model(
    name: str,
    num_classes: int = 1000,
    width: float = 1.0,
    dropout: float = 0.5,
    sparse: bool = True,
    weights: str | os.PathLike | None = None,
) -> nn.Module:
    """`name` in `IMAGENET_MODELS`. `weights`: a local state dict file for the dense model (loaded
    before `sparse` swaps Linear/Conv2d for sparsekern's masked layers, all-True masks)."""
    if name not in IMAGENET_MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(IMAGENET_MODELS)}")
    model = IMAGENET_MODELS[name][0](num_classes=num_classes, width=width, dropout=dropout)
    if weights is not None:
        load_weights(model, weights)
    if sparse:
        from sparsekern.nn import sparsify

        sparsify(model)
    return model


def paper_layer_names(name: str, model: nn.Module) -> dict[str, str]:
    """`{paper name: module name}`, e.g. AlexNet's `{"conv1": "features.0", ..., "fc8":
    "classifier.6"}`: the model's Conv2d/Linear layers in definition order (which is their
    execution order in these models) matched to the paper's names."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    paper = IMAGENET_MODELS[name][1]
    if len(layers) != len(paper):
        raise ValueError(f"{name}: expected {len(paper)} conv/fc layers, got {len(layers)}")
    return dict(zip(paper, layers))


__all__ = [
    "DROPOUT_FEEDS",
    "HAN_2015",
    "IMAGENET_MODELS",
    "MODELS",
    "CaffeAlexNet",
    "LeNet5",
    "LeNet300100",
    "METHOD_FIGURES",
    "alexnet",
    "alexnet_caffe",
    "build_imagenet_model",
    "build_model",
    "count_weights",
    "load_weights",
    "paper_layer_names",
    "vgg16",
]
