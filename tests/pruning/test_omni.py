"""Omni-sparsity (Yang et al. 2022): every level's sparsity exact per layer, the levels' masks
nested (one magnitude ranking of the shared weights), a sampled step trains the shared weights
inside its level and leaves the rest bitwise unchanged, at_sparsity gives an independent net."""

import pytest
import torch
import torch.nn.functional as F

from sparsekern.nn import check_masks, sparsify
from sparsekern.pruning import OmniSparsity, nested_magnitude_masks
from tests.helpers import TinyNet

LEVELS = (0.5, 0.75, 0.9, 0.95, 0.98)


def _setup(**kw):
    torch.manual_seed(0)
    model = sparsify(TinyNet(hidden=24))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    return model, opt, OmniSparsity(model, opt, levels=LEVELS, generator=gen, **kw)


def _batch(g):
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def test_levels_exact_and_nested():
    model, opt, omni = _setup()
    for s in LEVELS:
        for n, m in omni.masks[s].items():
            assert int(m.sum()) == round((1 - s) * m.numel()), (s, n)
    for lo, hi in zip(LEVELS, LEVELS[1:]):
        for n in omni.layers:
            a, b = omni.masks[lo][n], omni.masks[hi][n]
            assert bool((b <= a).all()), f"{hi} not inside {lo} in {n}"
    # the kept weights are the largest |w| of each layer
    for n, m in omni.layers.items():
        mask = omni.masks[0.9][n]
        w = m.weight.detach().abs()
        assert float(w[mask].min()) >= float(w[~mask].max())


def test_sampled_steps_train_shared_weights_and_spare_the_rest():
    model, opt, omni = _setup()
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        before = {n: m.weight.detach().clone() for n, m in omni.layers.items()}
        x, y = _batch(g)
        with omni.sample() as s:
            inside = {n: omni.masks[s][n].clone() for n in omni.layers}
            loss = F.cross_entropy(model(x), y)
            assert not check_masks(model)  # the forward ran the level's sub-network only
            opt.zero_grad()
            loss.backward()
            for n, m in omni.layers.items():
                assert int(m.weight.grad[~inside[n]].count_nonzero()) == 0
            opt.step()
        moved = 0
        for n, m in omni.layers.items():
            w = m.weight.detach()
            assert torch.equal(w[~inside[n]], before[n][~inside[n]]), (s, n)
            moved += int((w[inside[n]] != before[n][inside[n]]).sum())
            assert bool(m.mask.all())  # the shared net is dense again outside the context
        assert moved > 0
        omni.step()
    assert sum(omni.counts.values()) == 12 and len([c for c in omni.counts.values() if c]) >= 3


def test_at_sparsity_is_independent_and_exact():
    model, opt, omni = _setup()
    x = torch.randn(3, 1, 6, 6)
    dense = model(x).detach()
    net = omni.at_sparsity(0.95)
    for n, m in net.named_modules():
        if n in omni.layers:
            assert torch.equal(m.mask, omni.masks[0.95][n])
            assert int(m.weight[~m.mask].count_nonzero()) == 0
    assert torch.equal(model(x).detach(), dense)
    with omni.use(0.95):
        assert torch.equal(model(x).detach(), net(x).detach())
    assert abs(omni.level_sparsity(0.95) - 0.95) < 0.01
    with pytest.raises(ValueError, match="level in"):
        omni.at_sparsity(0.3)


def test_state_round_trip_and_refusals():
    model, opt, omni = _setup(update_every=5)
    state = omni.state_dict()
    model2, opt2, omni2 = _setup(update_every=5)
    with torch.no_grad():
        for m in omni2.layers.values():
            m.weight.mul_(-1).add_(0.01)
    omni2.masks = nested_magnitude_masks(omni2.layers, LEVELS)
    omni2.load_state_dict(state)
    for s in LEVELS:
        for n in omni.layers:
            assert torch.equal(omni.masks[s][n], omni2.masks[s][n])
    with pytest.raises(ValueError, match="configuration"):
        _setup(update_every=2)[2].load_state_dict(state)
    with pytest.raises(ValueError, match="levels"):
        OmniSparsity(model, opt, levels=(0.5, 1.0))
    with pytest.raises(ValueError, match="no sparsity"):
        OmniSparsity(model, opt, sparsity=0.5)
