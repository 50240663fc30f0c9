"""Hessian spectral-radius importance: power iteration on Hessian-vector products against the
eigenvalues of the explicit Hessian (float64), and the score's mechanism (removing the neuron it
ranks first lowers the spectral radius more than removing the one it ranks last)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sparsekern.pruning._dependency import build_channel_graph
from sparsekern.pruning.importance_hessian import hessian_channel_scores, hessian_spectral_radius
from sparsekern.pruning.structured import StructuredPruner, prune_channels

D64 = torch.float64


def _mlp(seed=0, hidden=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 2)).double()


def _data(seed=0, n=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 3, generator=g, dtype=D64), torch.randint(0, 2, (6,), generator=g))
        for _ in range(n)
    ]


def _explicit_hessian(model, data, names):
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().flatten() for n in names])
    shapes = [params[n].shape for n in names]

    def loss(vec):
        ps, i = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = vec[i : i + s.numel()].view(s)
            i += s.numel()
        return sum(F.cross_entropy(functional_call(model, ps, (x,)), y) for x, y in data) / len(
            data
        )

    return torch.autograd.functional.hessian(loss, flat)


@pytest.mark.parametrize("seed", [2, 4, 5])  # eigengaps |l2/l1| 0.68, 0.45, 0.63
def test_power_iteration_matches_explicit_hessian_eigenvalue(seed):
    model, data = _mlp(seed), _data(seed)
    names = [n for n, _ in model.named_parameters()]
    h = _explicit_hessian(model, data, names)
    eig = torch.linalg.eigvalsh(h)
    radius = float(eig.abs().max())
    rho, v = hessian_spectral_radius(
        model,
        list(model.parameters()),
        data,
        F.cross_entropy,
        iters=500,
        tol=1e-12,
        generator=torch.Generator().manual_seed(seed),
    )
    assert abs(rho) == pytest.approx(radius, rel=1e-6)
    vec = torch.cat([t.flatten() for t in v])
    torch.testing.assert_close(h @ vec, rho * vec, rtol=0, atol=1e-5 * radius)


def test_masked_weights_are_out_of_the_problem():
    model, data = _mlp(3), _data(3)
    names = [n for n, _ in model.named_parameters()]
    h = _explicit_hessian(model, data, names)
    masks = [torch.rand(p.shape, generator=torch.Generator().manual_seed(4)) > 0.4 for p in
             model.parameters()]  # fmt: skip
    m = torch.cat([k.flatten() for k in masks]).double()
    radius = float(torch.linalg.eigvalsh(h * m[:, None] * m[None, :]).abs().max())
    rho, v = hessian_spectral_radius(
        model, list(model.parameters()), data, F.cross_entropy, iters=500, tol=1e-12,
        masks=masks,
    )  # fmt: skip
    assert abs(rho) == pytest.approx(radius, rel=1e-6)
    assert all(bool((vi[~k] == 0).all()) for vi, k in zip(v, masks))


def _radius_without(model, data, unit):
    small = _mlp(0, 5)
    small.load_state_dict(model.state_dict())
    with torch.no_grad():  # removing hidden unit `unit`: its row, bias and column leave
        keep = [i for i in range(5) if i != unit]
        a, b = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
        a.weight.copy_(model[0].weight[keep])
        a.bias.copy_(model[0].bias[keep])
        b.weight.copy_(model[2].weight[:, keep])
        b.bias.copy_(model[2].bias)
    net = nn.Sequential(a, nn.Tanh(), b)
    h = _explicit_hessian(net, data, [n for n, _ in net.named_parameters()])
    return float(torch.linalg.eigvalsh(h).abs().max())


def test_scores_are_one_minus_eigenvector_mass_and_the_lowest_flattens_most():
    model, data = _mlp(5), _data(5)
    cg = build_channel_graph(model, (data[0][0][:1],))
    (group,) = cg.groups  # the 5 hidden units (the classifier keeps its outputs)
    scores, rho = hessian_channel_scores(model, cg, data, F.cross_entropy, iters=300, tol=1e-12)
    _, v = hessian_spectral_radius(
        model, list(model.parameters()), data, F.cross_entropy, iters=300, tol=1e-12
    )
    w1, b1, w2, _b2 = v
    mass = (w1**2).sum(1) + b1**2 + (w2**2).sum(0)
    got = torch.tensor([scores[r] for r in group.classes], dtype=D64)
    torch.testing.assert_close(got, 1 - mass, rtol=0, atol=1e-6)
    first, last = int(got.argmin()), int(got.argmax())
    assert _radius_without(model, data, first) < _radius_without(model, data, last)
    small = prune_channels(
        model, data[0][0][:1], amount=0.2, importance="hessian_radius", data=data,
        loss_fn=F.cross_entropy,
    )  # fmt: skip
    assert small[0].out_features == 4
    torch.testing.assert_close(small[0].weight, model[0].weight[[i != first for i in range(5)]])


def test_pruner_needs_data_and_runs_on_sparsified_models():
    from sparsekern.nn import sparsify

    model = sparsify(_mlp(6).float())
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match="hessian_radius"):
        StructuredPruner(model, example_inputs=x, importance="hessian_radius")
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    pruner = StructuredPruner(
        model, example_inputs=x, importance="hessian_radius", data=data, loss_fn=F.cross_entropy
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner.prune(0.4)
    assert pruner.export()[0].out_features == 3
    # scoring ran on a plain copy: the weights are only masked, never changed otherwise
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] * (p.detach() != 0))
