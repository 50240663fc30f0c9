"""Gibbs pruning (Labach and Valaee 2020): mask samples follow the Boltzmann distribution of the
magnitude energy at the temperature (checked by enumeration on a tiny layer), near-random at high
T, the energy-minimising (largest-magnitude) mask at low T; annealed temperature; exact target at
the end; dropped weights return with their values; the sampling state resumes."""

import itertools
import math

import pytest
import torch
from torch import nn

from sparsekern.nn import check_masks, sparsify
from sparsekern.pruning import GibbsPruner
from sparsekern.pruning.gibbs import chemical_potential
from tests.pruning.learned_helpers import FAMILIES, check_resume, lenet, train

pytestmark = pytest.mark.usefixtures("reference_path")


def tiny_pruner(**kw):
    model = sparsify(nn.Sequential(nn.Linear(2, 2, bias=False)))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.2, -1.0], [0.6, 1.4]]))
    gen = torch.Generator().manual_seed(0)
    return GibbsPruner(model, sparsity=0.5, end_step=100, generator=gen, **kw)


def test_samples_follow_the_boltzmann_distribution():
    pruner = tiny_pruner()
    T = 0.4
    a = pruner.unit_energies("0").flatten()
    mu = chemical_potential(a, 0.5, T)
    # Boltzmann weights of all 16 masks: p(m) ~ exp(-H(m) / T), H(m) = -sum m_i (a_i - mu)
    masks = list(itertools.product([0, 1], repeat=4))
    w = [math.exp(sum(mi * (float(ai) - mu) for mi, ai in zip(m, a)) / T) for m in masks]
    z = sum(w)
    n = 3000
    counts = dict.fromkeys(masks, 0)
    for _ in range(n):
        s = pruner.sample(T)["0"].flatten().tolist()
        counts[tuple(int(v) for v in s)] += 1
    for m, wm in zip(masks, w):
        p = wm / z
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(counts[m] / n - p) < 5 * sd + 1e-3, (m, counts[m] / n, p)
    # the expected kept fraction is the target density at any temperature
    for t in (0.01, 0.4, 100.0):
        assert float(pruner.keep_probabilities("0", t).mean()) == pytest.approx(0.5, abs=1e-6)


def test_high_temperature_random_low_temperature_magnitude():
    model, _ = lenet("300")
    pruner = GibbsPruner(model, sparsity=0.9, end_step=10, generator=torch.Generator())
    for n in pruner.layers:
        p_hot = pruner.keep_probabilities(n, 1e4)
        assert float((p_hot - 0.1).abs().max()) < 1e-3  # every weight ~ equally likely
        cold = pruner.sample(1e-6)[n]
        t0 = pruner.compute_masks(0.9)[n]  # the energy minimiser: the largest |w|
        assert int((cold != t0).sum()) <= 2  # at most a tie at the threshold


def test_annealing_schedule_and_exact_end():
    model, closure = lenet("300")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    pruner = GibbsPruner(model, opt, sparsity=0.9, end_step=4, t_start=1.0, t_end=1e-2,
                         generator=gen)  # fmt: skip
    temps = []
    train(model, pruner, opt, closure, 6, after=lambda: temps.append(pruner.temperature))
    assert temps[:3] == pytest.approx([10 ** (-2 * t / 4) for t in (1, 2, 3)])
    assert temps[3:] == [0.0, 0.0, 0.0] and pruner.frozen
    for m in pruner.layers.values():
        assert int(m.mask.sum()) == round(0.1 * m.mask.numel())
    assert check_masks(model) == []


def test_dropped_weight_returns_with_its_value():
    pruner = tiny_pruner()
    mod = pruner.layers["0"]
    w = mod.weight.detach().clone()
    drop = torch.tensor([[True, False], [True, True]])
    from sparsekern.pruning._latent import install_keeping_latent

    install_keeping_latent(pruner, {"0": drop}, pruner.latent)
    assert float(mod.weight.detach()[0, 1]) == 0.0
    install_keeping_latent(pruner, {"0": torch.ones_like(drop)}, pruner.latent)
    assert torch.equal(mod.weight.detach(), w)


def test_channel_structure():
    model, closure = lenet("5")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = GibbsPruner(model, opt, sparsity=0.5, end_step=2, structure="channel",
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    train(model, pruner, opt, closure, 2)
    for m in pruner.layers.values():
        rows = m.mask.flatten(1)
        assert bool((rows.all(1) | ~rows.any(1)).all())  # whole output channels
        assert int(rows.all(1).sum()) == round(0.5 * rows.shape[0])


def test_resume_same_trajectory_with_the_sampling_state():
    def make(m, o):
        return GibbsPruner(
            m, o, sparsity=0.8, end_step=8, generator=torch.Generator().manual_seed(5)
        )

    p1, p2 = check_resume(lambda: lenet("300"), make, 2, 3)
    assert torch.equal(p1.generator.get_state(), p2.generator.get_state())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runs_on_model_families(family):
    model, closure = FAMILIES[family]()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = GibbsPruner(model, opt, sparsity=0.8, end_step=2, generator=torch.Generator())
    train(model, pruner, opt, closure, 2)
    for m in pruner.layers.values():
        assert int(m.mask.sum()) == round(0.2 * m.mask.numel())


def test_non_finite_weight_is_an_error_naming_the_layer():
    model, _ = lenet("300")
    pruner = GibbsPruner(model, sparsity=0.9, end_step=4, generator=torch.Generator())
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="fc1"):
        pruner.step()
