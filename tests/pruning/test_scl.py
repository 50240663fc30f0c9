"""SCL (Tang et al. 2022): masks step(s) with a straight-through estimator; the mask variables'
gradient is the STE's (checked against autograd through w * STE(s) in float64), its surrogate is
positive, so the mask variables converge; exact target; mask variables resume."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import check_masks, sparsify
from sparsekern.pruning import SCLPruner
from sparsekern.pruning.scl import STES, ste_grad
from tests.pruning.learned_helpers import FAMILIES, check_resume, lenet, train

pytestmark = pytest.mark.usefixtures("reference_path")


class _Step(torch.autograd.Function):
    """Reference: forward the unit step, backward the STE's surrogate."""

    @staticmethod
    def forward(ctx, s, ste):
        ctx.save_for_backward(s)
        ctx.ste = ste
        return (s > 0).to(s.dtype)

    @staticmethod
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        return g * ste_grad(s, ctx.ste), None


def tiny():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    return model, x, y


@pytest.mark.parametrize("ste", STES)
def test_mask_gradient_is_the_ste_gradient(ste):
    model, x, y = tiny()
    pruner = SCLPruner(model, sparsity=None, penalty=1.0, ste=ste)  # the paper: step(s)
    # some mask variables negative, some pruned weights with latent values
    g = torch.Generator().manual_seed(2)
    for n in pruner.scores:
        pruner.scores[n] = torch.randn(pruner.scores[n].shape, generator=g, dtype=torch.float64)
        pruner.latent[n].copy_(torch.randn(pruner.latent[n].shape, generator=g).double())
    pruner.prune()  # masks step(s)
    assert any(not bool(m.mask.all()) for m in pruner.layers.values())
    got = pruner.mask_gradients(lambda: F.cross_entropy(model(x), y))
    # reference: the paper's re-parameterisation, weight * STE-step(s), through autograd
    w = {n: torch.where(m.mask, m.weight.detach(), pruner.latent[n]) for n, m in
         pruner.layers.items()}  # fmt: skip
    s = {n: pruner.scores[n].clone().requires_grad_(True) for n in pruner.scores}
    h = torch.tanh(F.linear(x, w["0"] * _Step.apply(s["0"], ste), model[0].bias))
    out = F.linear(h, w["2"] * _Step.apply(s["2"], ste), model[2].bias)
    ref = torch.autograd.grad(F.cross_entropy(out, y), [s["0"], s["2"]])
    for n, r in zip(("0", "2"), ref):
        torch.testing.assert_close(got[n].double(), r, rtol=1e-5, atol=1e-7)


def test_surrogates_are_positive():
    s = torch.linspace(-20, 20, 401, dtype=torch.float64)
    for ste in STES:
        assert bool((ste_grad(s, ste) > 0).all()), ste


def test_mask_variables_converge():
    """y depends on inputs 0 and 1 only: with the identity STE and the connection penalty the
    mask keeps exactly those two, the others' variables keep falling (no oscillation across the
    step), the kept ones' stay positive, and the mask stops changing."""
    torch.manual_seed(0)
    model = sparsify(nn.Linear(6, 1, bias=False)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = x[:, :1] * 2.0 - x[:, 1:2]
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, -1.0, 0.3, -0.2, 0.25, 0.1]]))
    # no optimizer step: the mask alone is trained, on a fixed landscape
    pruner = SCLPruner(model, sparsity=None, penalty=0.1, mask_lr=0.05, normalize=False)
    closure = lambda: F.mse_loss(model(x), y)  # noqa: E731
    masks, s_hist = [], []
    for _ in range(80):
        pruner.step(closure)
        masks.append(model.mask.clone())
        s_hist.append(pruner.scores[""].clone())
    assert masks[-1].flatten().tolist() == [True, True, False, False, False, False]
    assert all(torch.equal(m, masks[-1]) for m in masks[-20:])  # converged
    s_end = s_hist[-1].flatten()
    assert bool((s_end[:2] > 0).all()) and bool((s_end[2:] < 0).all())
    # the pruned ones' variables move monotonically down once off: no flip back
    for i in range(2, 6):
        off = [k for k, m in enumerate(masks) if not bool(m.flatten()[i])]
        assert off and all(not bool(masks[k].flatten()[i]) for k in range(off[0], len(masks)))


def test_exact_target_on_cubic_ramp_then_fixed():
    model, closure = lenet("300")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = SCLPruner(model, opt, sparsity=0.9, end_step=4)
    total = sum(m.mask.numel() for m in pruner.layers.values())
    kept = []

    def record():
        kept.append(sum(int(m.mask.sum()) for m in pruner.layers.values()))

    train(model, pruner, opt, closure, 6, after=record)
    expect = [round((1 - pruner.sparsity_at(t)) * total) for t in (1, 2, 3, 4)]
    assert kept[:4] == expect
    assert kept[3:] == [round(0.1 * total)] * 3
    assert pruner.sparsity_at(4) == 0.9
    assert check_masks(model) == []
    with pytest.raises(ValueError, match="penalty"):
        SCLPruner(model, sparsity=None)


def test_resume_same_trajectory():
    p1, p2 = check_resume(lambda: lenet("300"),
                          lambda m, o: SCLPruner(m, o, sparsity=0.8, end_step=6), 2, 3)  # fmt: skip
    for n in p1.scores:
        assert torch.equal(p1.scores[n], p2.scores[n])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runs_on_model_families(family):
    model, closure = FAMILIES[family]()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = SCLPruner(model, opt, sparsity=0.8, end_step=1)
    train(model, pruner, opt, closure, 1)
    total = sum(m.mask.numel() for m in pruner.layers.values())
    assert sum(int(m.mask.sum()) for m in pruner.layers.values()) == round(0.2 * total)
