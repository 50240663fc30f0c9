"""RigL: exact ERK / uniform densities, constant nonzero count, grown weights at zero with zeroed
optimizer state, cosine drop fraction, dense gradient only on update steps."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import sparsify
from sparsekern.pruning import RigLPruner, erk_densities, layer_densities, sparse_layers
from sparsekern.pruning._common import allocate_counts, dense_weight_grads
from tests.helpers import TinyNet

# The plain-PyTorch CPU path (fast); the kernels have their own tests.
pytestmark = pytest.mark.usefixtures("reference_path")


Net = partial(TinyNet, hidden=32)  # fc1 64 -> 32


class Wide(nn.Module):
    """LeNet-5's layer shapes (conv1 20x1x5x5 ... fc2 10x500), not run: ERK makes some dense."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)


@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("net", [Net, Wide])
def test_erk_exact_and_at_most_one(net, density):
    layers = sparse_layers(sparsify(net()))
    d = erk_densities(layers, density)
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    assert all(0.0 <= v <= 1.0 for v in d.values())
    kept = sum(round(d[n] * sizes[n]) for n in d)
    assert kept == round(density * sum(sizes.values()))  # exactly the target count
    # ERK proportions among the layers not made dense: density_l / raw_l is the same eps
    raw = {n: sum(m.weight.shape) / math.prod(m.weight.shape) for n, m in layers.items()}
    sparse = [n for n in d if d[n] < 1.0 and d[n] * sizes[n] >= 10]
    eps = [d[n] / raw[n] for n in sparse]
    assert max(eps) == pytest.approx(min(eps), rel=0.1 if density < 0.05 else 0.02)
    # layers made dense are those ERK favours most (largest raw scale)
    dense = [n for n in d if d[n] == 1.0]
    if dense and sparse:
        assert min(raw[n] for n in dense) >= max(raw[n] for n in sparse)
    uni = layer_densities(layers, density, "uniform")
    assert sum(round(uni[n] * sizes[n]) for n in uni) == round(density * sum(sizes.values()))


def test_erk_makes_small_layers_dense():
    d = erk_densities(sparse_layers(sparsify(Wide())), 0.1)
    assert d["fc2"] == 1.0 and d["conv1"] == 1.0  # raw ERK above 1: made dense, rest rescaled
    assert d["fc1"] < 0.1


def test_allocate_counts_by_hand():
    # raw 1 : 4 at 50% of 100 + 100: eps = 100 / 500 -> 0.2 / 0.8 -> 20 + 80
    assert allocate_counts({"a": 1.0, "b": 4.0}, {"a": 100, "b": 100}, 0.5) == {"a": 20, "b": 80}
    # raw 1 : 10: b would be 10 / 11 * ... > 1 -> dense 100, a gets the remaining 60
    assert allocate_counts({"a": 1.0, "b": 10.0}, {"a": 100, "b": 100}, 0.8) == {"a": 60, "b": 100}


def _step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_nnz_constant_and_grown_at_zero(device, optim):
    model = sparsify(Net()).to(device)
    params = model.parameters()
    opt = (
        torch.optim.SGD(params, lr=0.05, momentum=0.9)
        if optim == "sgd"
        else torch.optim.Adam(params, lr=1e-2)
    )
    pruner = RigLPruner(model, opt, sparsity=0.8, total_steps=40, delta=3,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert all(bool(m.mask.all()) for m in pruner.layers.values())  # construction: no change
    with pytest.raises(RuntimeError, match="prune"):
        pruner.step()
    pruner.prune()  # sparse from step 0
    counts = {n: int(m.mask.sum()) for n, m in pruner.layers.items()}
    assert sum(counts.values()) == round(0.2 * (36 + 2048 + 128))
    g = torch.Generator().manual_seed(2)
    calls, updates = 0, 0
    for _ in range(12):
        x = torch.randn(16, 1, 6, 6, generator=g).to(device)
        y = torch.randint(0, 4, (16,), generator=g).to(device)
        _step(model, opt, x, y)
        old = {n: m.mask.clone() for n, m in pruner.layers.items()}

        def closure(x=x, y=y):
            nonlocal calls
            calls += 1
            return F.cross_entropy(model(x), y)

        if pruner.step(closure):
            updates += 1
            moved = 0
            for n, m in pruner.layers.items():
                assert int(m.mask.sum()) == counts[n]  # nnz constant, per layer
                grown = m.mask & ~old[n]
                moved += int(grown.sum())
                assert torch.all(m.weight[grown] == 0)
                for v in opt.state[m.weight].values():
                    if torch.is_tensor(v) and v.shape == m.weight.shape:
                        assert torch.all(v[grown] == 0) and torch.all(v[~m.mask] == 0)
                assert torch.all(m.weight[~m.mask] == 0)
            assert moved > 0
    assert updates == calls == 4  # steps 3, 6, 9, 12 (< t_end 30): closure only then
    assert pruner.last_update["step"] == 12


def test_grow_picks_largest_dense_gradient():
    model = sparsify(nn.Sequential(nn.Linear(6, 2)))
    layer = model[0]
    pruner = RigLPruner(model, sparsity=0.5, total_steps=100, init="magnitude")
    with torch.no_grad():
        layer.mask.copy_(torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool))
        layer.weight.copy_(torch.tensor([[3.0, 0.1, 2.0, 0, 0, 0], [0.2, 5.0, 4.0, 0, 0, 0]]))
    grad = torch.tensor([[0.0, 0, 0, 0.5, -0.9, 0.1], [0, 0, 0, 0.3, 0.2, -0.7]])
    moved = pruner.update({"0": grad}, fraction=0.34)
    assert moved == {"0": 2}  # floor(0.34 * 6 active)
    # drop the two smallest |w| (0.1, 0.2), grow the two largest |grad| among inactive (0.9, 0.7)
    assert layer.mask.tolist() == [
        [True, False, True, False, True, False],
        [False, True, True, False, False, True],
    ]
    assert layer.weight[0, 4] == 0 and layer.weight[1, 5] == 0


def test_drop_fraction_cosine_and_t_end():
    model = sparsify(Net())
    pruner = RigLPruner(model, sparsity=0.9, total_steps=1000)
    assert pruner.t_end == 750 and pruner.delta == 100 and pruner.alpha == 0.3  # paper defaults
    assert pruner.drop_fraction(0) == pytest.approx(0.3)
    assert pruner.drop_fraction(375) == pytest.approx(0.15)
    assert pruner.drop_fraction(750) == 0.0
    assert not pruner.is_update_step(800)


def test_update_step_needs_closure():
    model = sparsify(Net())
    pruner = RigLPruner(model, sparsity=0.9, total_steps=10, delta=1)
    pruner.prune()
    with pytest.raises(ValueError, match="closure"):
        pruner.step()


def test_dense_weight_grads_match_dense_model():
    torch.manual_seed(0)
    dense = Net()
    model = sparsify(Net())
    model.load_state_dict(dense.state_dict())
    pruner = RigLPruner(model, sparsity=0.7, total_steps=10)
    pruner.prune()
    with torch.no_grad():  # the dense twin gets the same (zeroed) weights
        for n, m in pruner.layers.items():
            getattr(dense, n).weight.copy_(m.weight)
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 4, (4,))
    want = torch.autograd.grad(F.cross_entropy(dense(x), y), [dense.fc1.weight])[0]
    masks = [m.mask for m in pruner.layers.values()]
    got = dense_weight_grads(pruner.layers, lambda: F.cross_entropy(model(x), y))
    torch.testing.assert_close(got["fc1"], want)
    assert torch.any(got["fc1"][~model.fc1.mask] != 0)  # nonzero where the kernels' dW is 0
    assert all(m.mask is k for m, k in zip(pruner.layers.values(), masks))  # masks restored
    assert model.fc1.weight.grad is None  # the optimizer's .grad is not touched
