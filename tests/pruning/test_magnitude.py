"""Han's threshold rule: quality x std of the surviving weights; monotone masks; set_mask."""

import pytest
import torch
from torch import nn

from sparsekern.nn import SparseConv2d, SparseLinear, sparsify
from sparsekern.pruning import (
    han_threshold,
    keep_at_least,
    magnitude_mask,
    magnitude_prune_,
    prune_model_,
    quality_for_density,
)
from sparsekern.pruning.magnitude import _above


def test_threshold_is_quality_times_std_of_survivors():
    w = torch.randn(30, 20)
    mask = torch.rand(30, 20) > 0.4
    for q in (0.0, 0.3, 1.0, 2.5):
        expected = q * float(w[mask].double().std(correction=0))
        assert han_threshold(w, mask, q) == expected  # exactly, not approximately
    # the full mask: the population std of every weight
    full = torch.ones_like(mask)
    assert han_threshold(w, full, 1.0) == float(w.double().std(correction=0))


def test_threshold_edge_cases_and_errors():
    w = torch.randn(4, 5)
    assert han_threshold(w, torch.zeros(4, 5, dtype=torch.bool), 1.0) == 0.0
    one = torch.zeros(4, 5, dtype=torch.bool)
    one[1, 2] = True
    assert han_threshold(w, one, 3.0) == 0.0  # one survivor: std 0
    with pytest.raises(ValueError, match="quality >= 0"):
        han_threshold(w, one, -1.0)
    with pytest.raises(ValueError, match=r"\[4, 5\].*\[5, 4\]"):
        han_threshold(w, torch.ones(5, 4, dtype=torch.bool), 1.0)
    with pytest.raises(TypeError, match="torch.bool"):
        han_threshold(w, torch.ones(4, 5), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_mask_rule_is_exact(dtype):
    w = torch.randn(40, 30).to(dtype)
    mask = torch.rand(40, 30) > 0.2
    q = 0.7
    t = han_threshold(w, mask, q)
    expected = mask & (w.double().abs() > t)  # the rule, in float64
    assert torch.equal(magnitude_mask(w, mask, q), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_comparison_matches_float64_next_to_the_threshold(dtype):
    # Every representable value near a float64 threshold t (t itself not representable, so it
    # rounds up or down in the weight's dtype): the kept ones are exactly those > t in float64.
    for t in (0.1, 1.0 / 3.0, 2.0 / 3.0):
        grid = torch.linspace(t * 0.99, t * 1.01, 20001, dtype=torch.float64).to(dtype).unique()
        assert (grid.double() < t).any() and (grid.double() > t).any()
        assert torch.equal(_above(grid, t), grid.double() > t)
    exact = torch.tensor([0.5, 0.75], dtype=dtype)  # a threshold equal to a value prunes it
    assert torch.equal(_above(exact, 0.5), torch.tensor([False, True]))


def test_monotone_and_subset_over_rounds():
    w = torch.randn(64, 64)
    mask = torch.ones_like(w, dtype=torch.bool)
    kept = [int(mask.sum())]
    for _ in range(4):
        new = magnitude_mask(w, mask, 0.8)
        assert not (new & ~mask).any()  # never regrows
        mask = new
        kept.append(int(mask.sum()))
    assert all(a > b for a, b in zip(kept, kept[1:]))  # same quality, fewer survivors each round


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # reference path, kernels
def test_magnitude_prune_zeros_weights_and_optimizer_state_keeps_survivors(dtype, device):
    layer = SparseLinear(16, 8, dtype=dtype, device=device)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 16, dtype=dtype, device=device)
    layer(x).sum().backward()
    opt.step()  # creates momentum buffers everywhere
    before = layer.weight.detach().clone()
    mask = magnitude_prune_(layer, 1.0, optimizer=opt)
    assert mask is layer.mask
    assert 0 < int(mask.sum()) < mask.numel()
    assert torch.equal(layer.weight[mask], before[mask])  # survivors bit-identical
    assert (layer.weight[~mask] == 0).all()
    assert (opt.state[layer.weight]["momentum_buffer"][~mask] == 0).all()
    # pruned weights stay zero under further momentum steps
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        opt.step()
    assert (layer.weight[~mask] == 0).all()


def test_conv_layer():
    conv = SparseConv2d(3, 4, 3, dtype=torch.float64)
    mask = magnitude_prune_(conv, 0.5)
    t = 0.5 * float(conv.weight.detach().double().std(correction=0))  # before: all survived
    assert mask.shape == conv.weight.shape
    assert (conv.weight[~mask] == 0).all()
    assert int(mask.sum()) > 0
    assert t > 0


def test_quality_for_density_hits_target():
    w = torch.randn(100, 50)
    mask = torch.ones_like(w, dtype=torch.bool)
    for d in (0.5, 0.1, 0.08):
        q = quality_for_density(w, mask, d)
        got = int(magnitude_mask(w, mask, q).sum())
        assert abs(got - round(d * w.numel())) <= 2
    assert quality_for_density(w, mask, 1.0) == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quality_for_density(w, mask, 1.5)


def test_keep_at_least():
    w = torch.arange(1.0, 11.0).view(2, 5)
    old = torch.ones(2, 5, dtype=torch.bool)
    old[0, 4] = False  # weight 5 already pruned
    new = torch.zeros_like(old)
    floor = keep_at_least(w, old, new, 3)
    assert int(floor.sum()) == 3 and floor.view(-1)[[7, 8, 9]].all()  # 8, 9, 10
    assert keep_at_least(w, old, old, 3) is old  # enough already: unchanged
    assert torch.equal(keep_at_least(w, old, new, 20), old)  # cannot regrow


def _mlp():
    return sparsify(
        nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 3)
        )
    ).double()


def test_prune_model_per_layer_qualities():
    model = _mlp()
    kept = prune_model_(model, {"2": 1.0, "conv": 0.0})  # "4" not covered: untouched
    assert set(kept) == {"0", "2", "4"}
    assert kept["4"] == 1.0
    assert kept["0"] == 1.0  # quality 0 prunes only exact zeros
    assert kept["2"] < 0.5
    kept2 = prune_model_(model, {"*": 0.5})
    assert all(kept2[n] <= kept[n] for n in kept)
    with pytest.raises(KeyError, match="fc7"):
        prune_model_(model, {"fc7": 1.0})
    with pytest.raises(ValueError, match="sparsify"):
        prune_model_(nn.Linear(3, 3), 1.0)
