"""Shared by the tests of the mask-learning pruners (SCL, N:M decay, SR-STE, GaP, Gibbs,
Early-CROP): the three model families every method must run on (a LeNet, a torchvision CNN at a
small input, an HF transformer block), a few training steps with a closure, and a resume check."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.lenet import LeNet5, LeNet300100
from sparsekern.nn import check_masks, sparsify


def lenet(kind: str = "300"):
    torch.manual_seed(0)
    model = sparsify(LeNet300100() if kind == "300" else LeNet5())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    return model, lambda: F.cross_entropy(model(x), y)


def resnet():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = sparsify(tv.models.resnet18(num_classes=4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    y = torch.randint(0, 4, (2,), generator=g)
    return model, lambda: F.cross_entropy(model(x), y)


class _Block(nn.Module):
    """One GPT-2 block (HF ``Conv1D`` projections, weights ``[in, out]``) and a linear head."""

    def __init__(self, block, width):
        super().__init__()
        self.block, self.head = block, nn.Linear(width, 4)

    def forward(self, x):
        h = self.block(x)
        h = h[0] if isinstance(h, tuple) else h  # older transformers return a tuple
        return self.head(h.mean(1))


def hf_block():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=32, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    # eager attention: torch's CPU flash attention has no double backward (Early-CROP's H g)
    cfg._attn_implementation = "eager"
    block = transformers.GPT2LMHeadModel(cfg).transformer.h[0]
    model = sparsify(_Block(block, 32))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 32, generator=g)
    y = torch.randint(0, 4, (2,), generator=g)
    return model, lambda: F.cross_entropy(model(x), y)


FAMILIES = {"lenet": lenet, "resnet18": resnet, "hf_block": hf_block}


def train(model, pruner, opt, closure, steps: int, after=None) -> list[float]:
    """``steps`` SGD steps with ``pruner.step(closure)`` after each; asserts the mask invariant
    after every step. Returns the losses."""
    losses = []
    for _ in range(steps):
        loss = closure()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step(closure)
        if after is not None:
            after()
        assert check_masks(model) == [], check_masks(model)
        losses.append(float(loss.detach()))
    return losses


def roundtrip(obj):
    """``obj`` through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def check_resume(make, make_pruner, before: int, after: int, start=None, lr: float = 0.05):
    """Train ``before`` steps, checkpoint (model, optimizer, pruner through torch.save), train
    ``after`` more; a fresh model/optimizer/pruner loaded from the checkpoint must train the same
    ``after`` steps to bitwise the same weights, masks and pruner state."""
    model, closure = make()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    pruner = make_pruner(model, opt)
    if start is not None:
        start(pruner, closure)
    train(model, pruner, opt, closure, before)
    ckpt = roundtrip(
        {"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}
    )
    train(model, pruner, opt, closure, after)
    model2, closure2 = make()
    opt2 = torch.optim.SGD(model2.parameters(), lr=lr, momentum=0.9)
    pruner2 = make_pruner(model2, opt2)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    pruner2.load_state_dict(ckpt["pruner"])
    train(model2, pruner2, opt2, closure2, after)
    a, b = model.state_dict(), model2.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = pruner.state_dict(), pruner2.state_dict()
    assert sa["steps"] == sb["steps"] and sa["rounds"] == sb["rounds"]
    return pruner, pruner2
