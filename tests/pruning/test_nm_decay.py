"""N:M decay (Kao et al. 2022): mask decay multiplies the weights outside the N:M mask by a factor
falling 1 -> 0 on the schedule, then exact N:M; structure decay steps 8:8 -> 4:8 -> 2:8 at the
scheduled steps; resume."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import check_masks, sparsify
from sparsekern.pruning import NMDecayPruner, check_nm
from sparsekern.pruning.nm import nm_mask
from sparsekern.pruning.nm_decay import structure_sequence
from tests.pruning.learned_helpers import FAMILIES, check_resume, lenet, roundtrip, train

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


def _mlp64():
    torch.manual_seed(0)
    return sparsify(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))).double()


OPTIMIZERS = {
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.02),
    "adamw_wd": lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.1),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_mask_decay_trains_the_latent_weights_like_autograd(opt_name):
    """The paper's latent form in float64: a dense ``W`` trained by plain autograd through
    ``W_eff = W * (M + beta (1 - M))`` (L2 on ``W``), ``M`` the 1:4 mask of ``W`` at each decay
    step, ``W * M`` from ``beta = 0``: the pruner's weights are ``W_eff`` at every step, across
    the decay steps (momentum / Adam moments carried) and after the end."""
    make_opt, s = OPTIMIZERS[opt_name], 0.05
    model = _mlp64()
    names = ["0", "2"]
    lat = {n: model.get_submodule(n).weight.detach().clone().requires_grad_() for n in names}
    bias = {n: model.get_submodule(n).bias.detach().clone().requires_grad_() for n in names}
    ref_opt = make_opt([p for n in names for p in (lat[n], bias[n])])
    opt = make_opt(model.parameters())
    pruner = NMDecayPruner(
        model, opt, n_m=(1, 4), end_step=6, decay_steps=3, regularization="l2", reg_strength=s
    )
    assert pruner.event_steps() == [2, 4, 6]
    f = {n: torch.ones_like(lat[n]) for n in names}
    g = torch.Generator().manual_seed(3)
    for t in range(1, 10):
        x = torch.randn(8, 12, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=g)
        h = torch.relu(F.linear(x, lat["0"] * f["0"], bias["0"]))
        ref_loss = F.cross_entropy(F.linear(h, lat["2"] * f["2"], bias["2"]), y)
        # L2 on the latent W (from beta = 0 on, the pruned W are no part of the model)
        ref_loss = ref_loss + s / 2 * sum((lat[n] * (f[n] > 0)).pow(2).sum() for n in names)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        loss = F.cross_entropy(model(x), y) + pruner.regularization_loss()
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        if t in pruner.event_steps():
            beta = pruner.beta_at(t)
            for n in names:
                keep = nm_mask(lat[n].detach(), (1, 4))
                f[n] = torch.where(keep, 1.0, beta).double()
        for n in names:
            w = model.get_submodule(n).weight.detach()
            torch.testing.assert_close(w, (lat[n] * f[n]).detach(), rtol=0, atol=1e-12)
            if 0 < pruner.beta < 1:
                assert torch.equal(pruner.factor[n], f[n])
    assert pruner.factor == {} and check_masks(model) == []
    assert all(check_nm(model.get_submodule(n).mask, (1, 4)) for n in names)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_mask_decay_hooks_follow_the_optimizer_and_resume():
    """The step hooks exist exactly while a factor is below 1: installed at the first decay
    step, re-installed (once) by load_state_dict, moved by set_optimizer, removed at beta = 0;
    a decay step without an optimizer and optimizer.step(closure) are refused before any change."""
    model, closure = lenet("300")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = NMDecayPruner(model, opt, n_m=(2, 4), end_step=4, decay_steps=2)
    train(model, pruner, opt, closure, 1)
    assert not opt._optimizer_step_pre_hooks  # beta = 1: nothing to map
    train(model, pruner, opt, closure, 1)
    assert pruner.beta == 0.5
    assert len(opt._optimizer_step_pre_hooks) == len(opt._optimizer_step_post_hooks) == 1
    w = {n: m.weight.detach().clone() for n, m in pruner.layers.items()}
    loss = closure()
    opt.zero_grad()
    loss.backward()
    with pytest.raises(ValueError, match="closure"):
        opt.step(closure)
    assert all(torch.equal(m.weight, w[n]) for n, m in pruner.layers.items())

    model2, _ = lenet("300")
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.01, momentum=0.9)
    pruner2 = NMDecayPruner(model2, opt2, n_m=(2, 4), end_step=4, decay_steps=2)
    state = roundtrip(pruner.state_dict())
    pruner2.load_state_dict(state)
    pruner2.load_state_dict(state)
    assert len(opt2._optimizer_step_pre_hooks) == 1
    assert all(torch.equal(pruner2.factor[n], f) for n, f in pruner.factor.items())
    opt3 = torch.optim.SGD(model2.parameters(), lr=0.01)
    pruner2.set_optimizer(opt3)
    assert not opt2._optimizer_step_pre_hooks and len(opt3._optimizer_step_pre_hooks) == 1
    latent = {n: m.weight.detach() / pruner2.factor[n] for n, m in pruner2.layers.items()}
    pruner2.prune()  # skips the decay: the kept weights are the latent W
    assert not opt3._optimizer_step_pre_hooks
    for n, m in pruner2.layers.items():
        assert torch.equal(m.weight.detach(), torch.where(m.mask, latent[n], 0.0))

    pruner3 = NMDecayPruner(model2, None, n_m=(2, 4), end_step=4, decay_steps=2)
    pruner3.steps = 1
    with pytest.raises(RuntimeError, match="optimizer"):
        pruner3.step()
    assert pruner3.steps == 1 and pruner3.factor == {}

    train(model, pruner, opt, closure, 2)
    assert pruner.beta == 0.0 and pruner.factor == {}
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
