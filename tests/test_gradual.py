"""Gradual magnitude pruning: the cubic schedule (Zhu and Gupta 2017) and the pruner that follows
it, per layer and global."""

import pytest
import torch
import torch.nn.functional as F
from _nets import TinyNet as Net

from sparsekern.nn import sparsify
from sparsekern.pruning import GradualPruner, cubic_sparsity

# The plain-PyTorch CPU path (fast); the kernels have their own tests.
pytestmark = pytest.mark.usefixtures("reference_path")


def test_cubic_schedule():
    s_f, s_i, t0, n, dt = 0.9, 0.1, 50, 10, 20
    assert cubic_sparsity(0, s_f, t0, n, dt, s_i) == s_i
    assert cubic_sparsity(t0, s_f, t0, n, dt, s_i) == pytest.approx(s_i)
    assert cubic_sparsity(t0 + n * dt, s_f, t0, n, dt, s_i) == s_f  # hits s_f exactly
    assert cubic_sparsity(10_000, s_f, t0, n, dt, s_i) == s_f
    mid = t0 + n * dt // 2  # (1 - 1/2)^3 = 1/8
    assert cubic_sparsity(mid, s_f, t0, n, dt, s_i) == pytest.approx(s_f + (s_i - s_f) / 8)
    vals = [cubic_sparsity(t0 + k * dt, s_f, t0, n, dt, s_i) for k in range(n + 1)]
    steps = [b - a for a, b in zip(vals, vals[1:])]
    assert all(d > 0 for d in steps) and steps == sorted(steps, reverse=True)  # fast, then slow
    with pytest.raises(ValueError, match="initial_sparsity <= final_sparsity"):
        cubic_sparsity(0, 0.1, 0, 1, 1, 0.5)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruner_reaches_final_sparsity(device, scope):
    model = sparsify(Net()).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = GradualPruner(model, 0.8, begin_step=2, end_step=10, frequency=2, optimizer=opt,
                           scope=scope)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prev = {n: m.mask.clone() for n, m in pruner.layers.items()}
    densities = []
    for _ in range(14):
        x = torch.randn(8, 1, 6, 6, generator=g).to(device)
        y = torch.randint(0, 4, (8,), generator=g).to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        for n, m in pruner.layers.items():
            assert not torch.any(m.mask & ~prev[n])  # never regrows
            assert torch.all(m.weight[~m.mask] == 0)
            prev[n] = m.mask.clone()
        densities.append(pruner.density())
    assert [h["step"] for h in pruner.history] == [2, 4, 6, 8, 10]
    assert densities == sorted(densities, reverse=True)
    total = sum(m.weight.numel() for m in pruner.layers.values())
    if scope == "layer":  # every layer at round(0.2 * numel)
        for m in pruner.layers.values():
            assert int(m.mask.sum()) == round(0.2 * m.weight.numel())
    else:
        assert int(sum(m.mask.sum() for m in pruner.layers.values())) == round(0.2 * total)
    assert pruner.history[-1]["sparsity"] == 0.8


def test_validation():
    model = sparsify(Net())
    with pytest.raises(ValueError, match="multiple of frequency"):
        GradualPruner(model, 0.9, begin_step=0, end_step=10, frequency=3)
    with pytest.raises(ValueError, match="scope"):
        GradualPruner(model, 0.9, begin_step=0, end_step=10, frequency=2, scope="net")
