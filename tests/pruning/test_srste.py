"""SR-STE (Zhou et al. 2021): the pruned weights move by g + lambda W at the optimizer's learning
rate, the mask is the N:M mask of the dense weights every step, revived weights return with their
dense value, exact N:M throughout, resume."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import check_masks, sparsify
from sparsekern.pruning import SRSTEPruner, check_nm
from tests.pruning.learned_helpers import FAMILIES, check_resume, lenet, train

pytestmark = pytest.mark.usefixtures("reference_path")


def tiny():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    return model, x, y


def test_pruned_weights_move_by_gradient_plus_lambda_w():
    model, x, y = tiny()
    lr, lam = 0.1, 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    pruner = SRSTEPruner(model, opt, n_m=(2, 4), decay=lam)
    pruner.prune()
    # plant latent values at the pruned entries (as if they had been pruned with those values)
    for n, mod in pruner.layers.items():
        pruner.latent[n].copy_(torch.randn_like(mod.weight) * 0.01 * ~mod.mask)
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    loss = closure()
    opt.zero_grad()
    loss.backward()
    opt.step()
    # reference: the dense gradient of the sparse forward at the weights after the step
    before = {n: (m.weight.detach().clone(), m.mask.clone(), pruner.latent[n].clone())
              for n, m in pruner.layers.items()}  # fmt: skip
    ws = [before[n][0].clone().requires_grad_(True) for n in ("0", "2")]
    out = F.linear(torch.tanh(F.linear(x, ws[0], model[0].bias)), ws[1], model[2].bias)
    gref = torch.autograd.grad(F.cross_entropy(out, y), ws)
    pruner.step(closure)
    for (n, (w, mask, lat)), g in zip(before.items(), gref):
        expect = torch.where(~mask, lat - lr * (g + lam * lat), torch.zeros_like(lat))
        full = torch.where(mask, w, expect)
        mod = pruner.layers[n]
        # the new mask is the N:M mask of the updated dense weights; values follow it
        assert check_nm(mod.mask, (2, 4))
        assert torch.allclose(torch.where(mod.mask, mod.weight.detach(), pruner.latent[n]), full)
        keep = full.abs().reshape(full.shape[0], -1, 4).topk(2, dim=-1).indices
        ref_mask = torch.zeros_like(full.reshape(full.shape[0], -1, 4), dtype=torch.bool)
        ref_mask.scatter_(-1, keep, True)
        assert torch.equal(mod.mask, ref_mask.reshape(full.shape))


def test_revived_weight_returns_with_its_dense_value():
    model, x, y = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = SRSTEPruner(model, opt, n_m=(1, 4))
    pruner.prune()
    mod = pruner.layers["0"]
    i = int((~mod.mask[0, :4]).nonzero()[0])
    pruner.latent["0"][0, i] = 100.0  # far above its group: the next mask must keep it
    pruner.step(lambda: F.cross_entropy(model(x), y))
    assert bool(mod.mask[0, i])
    assert float(mod.weight.detach()[0, i]) == pytest.approx(100.0, rel=1e-3)
    assert int(mod.mask[0, :4].sum()) == 1 and check_masks(model) == []
    assert pruner.flips >= 2


def test_exact_nm_every_step_and_requirements():
    model, closure = lenet("300")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = SRSTEPruner(model, opt, n_m=(2, 4))
    with pytest.raises(RuntimeError, match="prune"):
        pruner.step(closure)
    pruner.prune()
    with pytest.raises(ValueError, match="closure"):
        pruner.step(None)
    train(model, pruner, opt, closure, 3, after=lambda: [
        _assert(check_nm(m.mask, (2, 4))) for m in pruner.layers.values()
    ])  # fmt: skip
    assert pruner.current_sparsity() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="n_m"):
        SRSTEPruner(model, opt, n_m=(5, 4))


def _assert(ok):
    assert ok


def test_resume_same_trajectory():
    check_resume(lambda: lenet("300"), lambda m, o: SRSTEPruner(m, o), 2, 2,
                 start=lambda p, c: p.prune())  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runs_on_model_families(family):
    model, closure = FAMILIES[family]()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = SRSTEPruner(model, opt, n_m=(2, 4))
    pruner.prune()
    train(model, pruner, opt, closure, 1)
    for n, m in pruner.layers.items():
        w = m.mask.t() if getattr(m, "weight_layout", "out_in") == "in_out" else m.mask
        assert check_nm(w, (2, 4)), n
