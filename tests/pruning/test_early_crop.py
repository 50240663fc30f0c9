"""Early-CROP (Rachwan et al. 2022): the score |theta * H g| equals a float64 reference built from
the explicit Hessian; the trigger fires at the epoch the authors' rule picks on a synthetic
trajectory; pruning reaches exactly the target in its rounds; channel variant; resume."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import check_masks, set_mask, sparsify
from sparsekern.pruning import EarlyCROPPruner
from sparsekern.pruning.early_crop import CroPImportance, crop_scores
from tests.pruning.learned_helpers import FAMILIES, lenet, roundtrip, train

pytestmark = pytest.mark.usefixtures("reference_path")


def tiny():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=g)
    return model, x, y


def test_score_equals_explicit_hessian_reference():
    model, x, y = tiny()
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = False  # one pruned weight: it must score 0, and the rest see it at 0
    set_mask(model[0], mask)
    names = ["0.weight", "2.weight"]
    b1, b2 = model[0].bias.detach(), model[2].bias.detach()

    def loss_of(flat):  # the same net as a plain function of its weights
        w1, w2 = flat[:12].view(3, 4) * mask, flat[12:].view(2, 3)
        return F.cross_entropy(F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2), y)

    theta = torch.cat([model.get_parameter(n).detach().flatten() for n in names])
    g = torch.autograd.functional.jacobian(loss_of, theta)
    hess = torch.autograd.functional.hessian(loss_of, theta)  # [P, P], float64
    ref = (theta * (hess @ g)).abs()
    layers = {"0": model[0], "2": model[2]}
    got = crop_scores(layers, lambda: F.cross_entropy(model(x), y))
    flat = torch.cat([got["0"].flatten(), got["2"].flatten()])
    torch.testing.assert_close(flat, ref, rtol=1e-9, atol=1e-12)
    assert float(got["0"][1, 2]) == 0.0


def test_trigger_fires_at_the_authors_epoch():
    model, _ = lenet("300")
    pruner = EarlyCROPPruner(model, sparsity=0.9)
    ref = torch.ones(10, dtype=torch.float64)
    # r_e = ||theta_e - theta_1|| / ||theta_1||: 0.5, 0.8, 0.9, 0.91 at epochs 2..5; threshold
    # 0.5 * (1 - 0.9) = 0.05; |r_e - r_(e-1)|: 0.5, 0.3, 0.1, 0.01 -> fires at epoch 5
    fired = [pruner.observe(ref)]
    for r in (0.5, 0.8, 0.9, 0.91):
        fired.append(pruner.observe(ref * (1 + r)))
    assert fired == [False, False, False, False, True]
    assert pruner.threshold == pytest.approx(0.05)
    assert pruner.changes == pytest.approx([0.5, 0.8, 0.9, 0.91])


def test_epoch_end_prunes_exactly_in_rounds_then_fixed():
    model, closure = lenet("300")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = EarlyCROPPruner(model, opt, sparsity=0.95, rounds=4, max_epoch=2)
    assert pruner.round_targets() == pytest.approx([0.5, 0.725, 0.8375, 0.89375, 0.921875, 0.95])
    train(model, pruner, opt, closure, 2)
    assert not pruner.epoch_end(closure)  # first epoch: reference only
    train(model, pruner, opt, closure, 2)
    assert pruner.epoch_end(closure)  # max_epoch
    assert pruner.pruned_at_epoch == 2
    targets = [h["target"] for h in pruner.history]
    assert targets == pytest.approx(pruner.round_targets())
    total = sum(m.mask.numel() for m in pruner.layers.values())
    assert sum(int(m.mask.sum()) for m in pruner.layers.values()) == round(0.05 * total)
    assert check_masks(model) == []
    before = [m.mask.clone() for m in pruner.layers.values()]
    train(model, pruner, opt, closure, 2)
    assert not pruner.epoch_end(closure)
    assert all(torch.equal(a, m.mask) for a, m in zip(before, pruner.layers.values()))
    with pytest.raises(ValueError, match="closure"):
        EarlyCROPPruner(lenet("300")[0], sparsity=0.5, max_epoch=1).epoch_end(None)


def test_channel_variant_keeps_whole_channels():
    model, closure = lenet("5")
    pruner = EarlyCROPPruner(model, sparsity=0.5, rounds=1, structure="channel")
    pruner.prune(closure=closure)
    kept = total = 0
    for m in pruner.layers.values():
        rows = m.mask.flatten(1)
        assert bool((rows.all(1) | ~rows.any(1)).all())
        assert bool(rows.any())
        kept += int(rows.all(1).sum())
        total += rows.shape[0]
    assert kept == round(0.5 * total)


def test_importance_is_pluggable_and_state_resumes():
    model, closure = lenet("300")
    scores = CroPImportance()(dict(EarlyCROPPruner(model, sparsity=0.5).layers), closure)
    assert set(scores) == {"fc1", "fc2", "fc3"}
    pruner = EarlyCROPPruner(model, sparsity=0.5)
    pruner.observe(torch.ones(3, dtype=torch.float64))
    pruner.observe(torch.full((3,), 1.5, dtype=torch.float64))
    state = roundtrip(pruner.state_dict())
    p2 = EarlyCROPPruner(model, sparsity=0.5)
    p2.load_state_dict(state)
    assert p2.changes == pruner.changes and p2.threshold == pruner.threshold
    assert p2.observe(torch.full((3,), 1.52, dtype=torch.float64)) == pruner.observe(
        torch.full((3,), 1.52, dtype=torch.float64)
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runs_on_model_families(family):
    model, closure = FAMILIES[family]()
    pruner = EarlyCROPPruner(model, sparsity=0.8, rounds=1)
    pruner.prune(closure=closure)
    total = sum(m.mask.numel() for m in pruner.layers.values())
    assert sum(int(m.mask.sum()) for m in pruner.layers.values()) == round(0.2 * total)
    assert check_masks(model) == []
