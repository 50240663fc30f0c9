"""Gradual magnitude pruning: the cubic schedule (Zhu and Gupta 2017) and the pruner that follows
it, per layer and global."""

import pytest
import torch
import torch.nn.functional as F

from sparsekern.nn import sparsify
from sparsekern.pruning import Cubic, GradualPruner
from tests.helpers import TinyNet as Net

# The plain-PyTorch CPU path (fast); the kernels have their own tests.
pytestmark = pytest.mark.usefixtures("reference_path")


def test_cubic_schedule():
    s_f, s_i, t0, end, dt = 0.9, 0.1, 50, 250, 20
    c = Cubic(s_f, t0, end, dt, initial=s_i)
    assert c(0) == s_i and c(t0) == s_i
    assert c(end) == s_f and c(10_000) == s_f  # hits s_f exactly
    assert c((t0 + end) // 2) == pytest.approx(s_f + (s_i - s_f) / 8)  # (1 - 1/2)^3 = 1/8
    vals = [c(t) for t in range(t0, end + 1, dt)]
    steps = [b - a for a, b in zip(vals, vals[1:])]
    assert all(d > 0 for d in steps) and steps == sorted(steps, reverse=True)  # fast, then slow
    assert [t for t in range(400) if c.is_update(t)] == list(range(t0, end + 1, dt))
    assert c.clock == "step" and c.state_dict()["type"] == "Cubic"
    with pytest.raises(ValueError, match="initial <= sparsity"):
        Cubic(0.1, 0, 1, 1, initial=0.5)
    with pytest.raises(ValueError, match="multiple of every"):
        Cubic(0.9, 0, 10, 3)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruner_reaches_final_sparsity(device, scope):
    model = sparsify(Net()).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = GradualPruner(model, opt, sparsity=0.8, begin_step=2, end_step=10, frequency=2,
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
        changed = pruner.step()
        assert changed == (pruner.steps in (4, 6, 8, 10))  # step 2: s_i = 0, no change
        for n, m in pruner.layers.items():
            assert not torch.any(m.mask & ~prev[n])  # never regrows
            assert torch.all(m.weight[~m.mask] == 0)
            prev[n] = m.mask.clone()
        densities.append(1 - pruner.current_sparsity())
    assert [h["step"] for h in pruner.history] == [2, 4, 6, 8, 10]
    assert densities == sorted(densities, reverse=True)
    total = sum(m.weight.numel() for m in pruner.layers.values())
    if scope == "layer":  # every layer at round(0.2 * numel)
        for m in pruner.layers.values():
            assert int(m.mask.sum()) == round(0.2 * m.weight.numel())
    else:
        assert int(sum(m.mask.sum() for m in pruner.layers.values())) == round(0.2 * total)
    assert pruner.history[-1]["target"] == 0.8


def test_validation():
    model = sparsify(Net())
    with pytest.raises(ValueError, match="multiple of every"):
        GradualPruner(model, sparsity=0.9, begin_step=0, end_step=10, frequency=3)
    with pytest.raises(ValueError, match="scope"):
        GradualPruner(model, sparsity=0.9, begin_step=0, end_step=10, frequency=2, scope="net")
