"""Multi-task pruning of a shared encoder: the importance is that of the weighted multi-task loss
(against a float64 reference), the budget is met exactly (element-wise) or filled without overflow
(rank-wise), and the low-rank factors reproduce the kept SVD components."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import sparsify
from sparsekern.pruning import LowRankLinear, MultiTaskImportance, MultiTaskPruner

WEIGHTS = {"a": 1.0, "b": 0.5, "c": 2.0}


def _setup():
    torch.manual_seed(0)
    enc = sparsify(nn.Sequential(nn.Linear(7, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU()))
    heads = nn.ModuleDict({t: nn.Linear(9, 3) for t in WEIGHTS})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 7, generator=g)
    ys = {t: torch.randint(0, 3, (10,), generator=g) for t in WEIGHTS}

    def closure():
        h = enc(x)
        return {t: F.cross_entropy(heads[t](h), ys[t]) for t in WEIGHTS}

    return enc, heads, x, ys, closure


def _reference(enc, heads, x, ys):
    """|w * dL/dw| of L = sum_t w_t CE_t, all in float64."""
    w0 = enc[0].weight.detach().double().requires_grad_()
    w2 = enc[2].weight.detach().double().requires_grad_()
    h = F.relu(F.linear(F.relu(F.linear(x.double(), w0, enc[0].bias.double())), w2,
                        enc[2].bias.double()))  # fmt: skip
    loss = sum(
        WEIGHTS[t]
        * F.cross_entropy(
            F.linear(h, heads[t].weight.double(), heads[t].bias.double()), ys[t]
        )  # fmt: skip
        for t in WEIGHTS
    )
    g0, g2 = torch.autograd.grad(loss, [w0, w2])
    return {"0": (w0 * g0).abs().detach(), "2": (w2 * g2).abs().detach()}


def test_importance_matches_float64_reference():
    enc, heads, x, ys, closure = _setup()
    imp = MultiTaskImportance(WEIGHTS)
    got = imp(MultiTaskPruner(enc, budget=50).layers, closure)
    ref = _reference(enc, heads, x, ys)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-9)
    # the weights matter: another weighting gives other scores
    other = MultiTaskImportance({"a": 1.0, "b": 1.0, "c": 1.0})(enc_layers(enc), closure)
    assert not torch.allclose(other["0"], got["0"])
    with pytest.raises(ValueError, match="tasks"):
        imp(enc_layers(enc), lambda: {"a": closure()["a"]})


def enc_layers(enc):
    return {"0": enc[0], "2": enc[2]}


@pytest.mark.filterwarnings("ignore:.*layer collapse")
@pytest.mark.parametrize("budget", [1, 50, 97, 191])
def test_element_budget_exact(budget):
    enc, heads, x, ys, closure = _setup()
    p = MultiTaskPruner(enc, budget=budget, task_weights=WEIGHTS, min_density=0)
    p.prune(closure=closure)
    kept = sum(int(m.mask.sum()) for m in p.layers.values())
    assert kept == budget
    scores = _reference(enc, heads, x, ys)
    # the kept weights are the top-budget scores (global ranking)
    allv = torch.cat([scores[n].flatten() for n in scores])
    keptv = torch.cat([scores[n].flatten()[p.layers[n].mask.flatten()] for n in scores])
    assert float(keptv.min()) >= float(allv.topk(budget).values.min()) * (1 - 1e-5)


@pytest.mark.parametrize("criterion", ["taylor", "magnitude"])
def test_rank_budget_filled_without_overflow(criterion):
    enc, heads, x, ys, closure = _setup()
    before = {n: enc[int(n)].weight.detach().clone() for n in ("0", "2")}
    budget = 120
    p = MultiTaskPruner(enc, mode="rank", budget=budget, task_weights=WEIGHTS, criterion=criterion)
    scores = p.component_scores(closure)
    ranks = p.prune(closure=closure)
    cost = {"0": 7 + 12, "2": 12 + 9}
    used = sum(ranks[n] * cost[n] for n in ranks)
    assert used == p.factor_params() <= budget
    assert budget - used < min(cost[n] for n in cost if ranks[n] < len(scores[n]))
    assert all(isinstance(enc[int(n)], LowRankLinear) for n in ranks)
    # by magnitude, each layer keeps its top singular values: the best rank-r approximation
    q = MultiTaskPruner(_setup()[0], mode="rank", budget=150, criterion="magnitude")
    qr = q.prune()
    for n in ("0", "2"):
        low, r = q.model[int(n)], qr[n]
        u, sv, vh = torch.linalg.svd(before[n].double(), full_matrices=False)
        best = (u[:, :r] * sv[:r]) @ vh[:r]
        torch.testing.assert_close((low.a @ low.b).double(), best, rtol=1e-5, atol=1e-5)
        y = low(torch.ones(2, low.b.shape[1]))
        torch.testing.assert_close(
            y, torch.ones(2, low.b.shape[1]) @ (low.a @ low.b).t() + low.bias
        )
    with pytest.raises(ValueError, match="budget >="):
        MultiTaskPruner(_setup()[0], mode="rank", budget=10, criterion="magnitude").prune()
