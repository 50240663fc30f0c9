"""N:M decay (Kao et al. 2022): mask decay multiplies the weights outside the N:M mask by a factor
falling 1 -> 0 on the schedule, then exact N:M; structure decay steps 8:8 -> 4:8 -> 2:8 at the
scheduled steps; resume."""

import pytest
import torch

from sparsekern.nn import check_masks
from sparsekern.pruning import NMDecayPruner, check_nm
from sparsekern.pruning.nm_decay import structure_sequence
from tests.pruning.learned_helpers import FAMILIES, check_resume, lenet, train

pytestmark = pytest.mark.usefixtures("reference_path")


def test_structure_sequence():
    assert structure_sequence(2, 8) == [8, 4, 2]
    assert structure_sequence(1, 8) == [8, 4, 2, 1]
    assert structure_sequence(3, 8) == [8, 4, 3]
    assert structure_sequence(2, 4) == [4, 2]


def test_mask_decay_factor_follows_schedule_then_exact_nm():
    model, closure = lenet("300")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = NMDecayPruner(model, opt, n_m=(2, 4), recipe="mask", end_step=8, decay_steps=4)
    assert pruner.event_steps() == [2, 4, 6, 8]
    assert [pruner.beta_at(t) for t in range(9)] == [1, 1, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0]
    for t in range(1, 9):
        loss = closure()
        opt.zero_grad()
        loss.backward()
        opt.step()
        w_before = {n: m.weight.detach().clone() for n, m in pruner.layers.items()}
        f_before = {n: f.clone() for n, f in pruner.factor.items()}
        pruner.step()
        beta = pruner.beta_at(t)
        if t < 8:
            assert all(bool(m.mask.all()) for m in pruner.layers.values())  # dense until the end
        if t in (2, 4, 6):
            assert pruner.beta == beta
            for n, m in pruner.layers.items():
                f = pruner.factor[n]
                # factor 1 on exactly the N:M mask of the latent weights, beta elsewhere
                inside = f == 1
                assert check_nm(inside, (2, 4))
                assert bool(((f == 1) | (f == beta)).all())
                old = f_before.get(n, torch.ones_like(f))
                assert torch.allclose(m.weight.detach(), w_before[n] * f / old)
        elif t < 8:  # between events nothing is rescaled
            for n, m in pruner.layers.items():
                assert torch.equal(m.weight.detach(), w_before[n])
    assert pruner.beta == 0.0 and pruner.factor == {}
    for m in pruner.layers.values():
        assert check_nm(m.mask, (2, 4))
    assert check_masks(model) == []
    assert pruner.current_sparsity() == pytest.approx(0.5)
    train(model, pruner, opt, closure, 2)  # fixed afterwards
    assert all(check_nm(m.mask, (2, 4)) for m in pruner.layers.values())


def test_structure_decay_steps_through_patterns():
    model, closure = lenet("300")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = NMDecayPruner(model, opt, n_m=(2, 8), recipe="structure", begin_step=2, end_step=6)
    assert pruner.event_steps() == [4, 6]  # 8:8 until step 4, 4:8 until 6, then 2:8
    seen = {}
    last = {n: m.mask.clone() for n, m in pruner.layers.items()}

    def record():
        seen[pruner.steps] = pruner.stage_n
        for n, m in pruner.layers.items():
            assert check_nm(m.mask, (pruner.stage_n, 8))
            assert not bool((m.mask & ~last[n]).any())  # a stage keeps within the last one
            last[n] = m.mask.clone()

    train(model, pruner, opt, closure, 8, after=record)
    assert seen == {1: 8, 2: 8, 3: 8, 4: 4, 5: 4, 6: 2, 7: 2, 8: 2}
    assert [h["n"] for h in pruner.history] == [4, 2]


def test_prune_skips_to_final_and_bad_args():
    model, _ = lenet("300")
    pruner = NMDecayPruner(model, n_m=(1, 4), total_steps=100)
    assert pruner.end_step == 75
    pruner.prune()
    assert all(check_nm(m.mask, (1, 4)) for m in pruner.layers.values())
    with pytest.raises(ValueError, match="recipe"):
        NMDecayPruner(model, recipe="fast", total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        NMDecayPruner(model)


@pytest.mark.parametrize("recipe", ["mask", "structure"])
def test_resume_same_trajectory(recipe):
    check_resume(lambda: lenet("300"),
                 lambda m, o: NMDecayPruner(m, o, recipe=recipe, end_step=4, decay_steps=2),
                 3, 3)  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runs_on_model_families(family):
    model, closure = FAMILIES[family]()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = NMDecayPruner(model, opt, n_m=(2, 4), end_step=2, decay_steps=2)
    train(model, pruner, opt, closure, 2)
    for n, m in pruner.layers.items():
        w = m.mask.t() if getattr(m, "weight_layout", "out_in") == "in_out" else m.mask
        assert check_nm(w, (2, 4)), n


def test_non_finite_weight_is_an_error_naming_the_layer():
    model, _ = lenet("300")
    pruner = NMDecayPruner(model, end_step=2, decay_steps=1)
    with torch.no_grad():
        model.fc3.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="fc3"):
        pruner.prune()
