"""Global magnitude pruning: exact global top-k by |w|, per-layer floor, never regrows, the
optimizer state of pruned weights zeroed, a few training steps on a tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F

from sparsekern.nn import sparsify
from sparsekern.pruning import GlobalMagnitudePruner, global_magnitude_masks, sparse_layers
from tests.helpers import TinyNet as Net

# The plain-PyTorch CPU path (fast); the kernels have their own tests.
pytestmark = pytest.mark.usefixtures("reference_path")


def _train(model, opt, pruner, steps, device):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 1, 6, 6, generator=g).to(device)
        y = torch.randint(0, 4, (8,), generator=g).to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()


def test_keeps_exactly_the_global_largest(device):
    model = sparsify(Net()).to(device)
    layers = sparse_layers(model)
    masks = global_magnitude_masks(layers, sparsity=0.8)
    total = sum(m.weight.numel() for m in layers.values())  # 36 + 1024 + 64 = 1124
    kept = sum(int(k.sum()) for k in masks.values())
    assert kept == round(0.2 * total)
    # every kept |w| >= every pruned |w|, across layers
    w = torch.cat([layers[n].weight.detach().abs().flatten() for n in layers])
    k = torch.cat([masks[n].flatten() for n in layers])
    assert w[k].min() >= w[~k].max()


def test_floor_per_layer(device):
    model = sparsify(Net()).to(device)
    with torch.no_grad():
        model.fc2.weight.mul_(1e-3)  # globally the smallest: pure global MP empties fc2
    layers = sparse_layers(model)
    with pytest.warns(RuntimeWarning, match="keep no weight"):
        assert int(global_magnitude_masks(layers, 0.9, min_density=0)["fc2"].sum()) == 0
    # the default floor, min(1%, (1 - s) / 2) and one weight: fc2 keeps its largest
    assert int(global_magnitude_masks(layers, 0.9)["fc2"].sum()) == 1
    masks = global_magnitude_masks(layers, 0.9, min_density=0.05)  # floors 2 + 52 + 4 <= 112
    assert int(masks["fc2"].sum()) == math.ceil(0.05 * 64)
    assert int(masks["conv"].sum()) >= math.ceil(0.05 * 36)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * 1124)  # total still exact
    # fc2's floor is its own largest |w|
    w = model.fc2.weight.detach().abs()
    assert w[masks["fc2"]].min() >= w[~masks["fc2"]].max()
    with pytest.raises(ValueError, match="floors"):
        global_magnitude_masks(layers, 0.9, min_density=0.1)  # 4 + 103 + 7 > 112 kept
    with pytest.raises(ValueError, match="min_density"):
        GlobalMagnitudePruner(model, sparsity=0.95, min_density=0.1)


def test_pruner_lifecycle_zeroes_and_never_regrows(device):
    model = sparsify(Net()).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = GlobalMagnitudePruner(model, opt, sparsity=0.5)
    _train(model, opt, pruner, 3, device)
    pruner.prune()
    assert 1 - pruner.current_sparsity() == pytest.approx(round(0.5 * 1124) / 1124)
    first = {n: m.mask.clone() for n, m in pruner.layers.items()}
    for m in pruner.layers.values():
        assert torch.all(m.weight[~m.mask] == 0)
        assert torch.all(opt.state[m.weight]["momentum_buffer"][~m.mask] == 0)
    _train(model, opt, pruner, 3, device)
    pruner.prune(sparsity=0.9)
    for n, m in pruner.layers.items():
        assert not torch.any(m.mask & ~first[n])  # nothing regrown
    _train(model, opt, pruner, 3, device)  # pruned weights stay exactly zero under momentum
    summary = pruner.finalize()
    assert summary["total_kept"] == pytest.approx(round(0.1 * 1124) / 1124)
    assert pruner.steps == 9
    for m in pruner.layers.values():
        assert torch.all(m.weight[~m.mask] == 0)


def test_rejects_bad_sparsity():
    model = sparsify(Net())
    with pytest.raises(ValueError, match=r"sparsity in \[0, 1\], got 1.5"):
        GlobalMagnitudePruner(model, sparsity=1.5)
    with pytest.raises(ValueError, match="sparse layers"):
        GlobalMagnitudePruner(Net(), sparsity=0.5)
