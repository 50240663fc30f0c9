"""The MNIST recipes: each method's phases, and its pruner."""

import pytest
import torch

from models import build_model
from scripts._lib import recipes
from scripts._lib.recipes import METHODS, build_pruner, nm_for_sparsity, plan_phases
from sparsekern.pruning import (
    EarlyCROPPruner,
    GaPPruner,
    GibbsPruner,
    GlobalMagnitudePruner,
    GradualPruner,
    HanPruner,
    NMDecayPruner,
    NMPruner,
    RigLPruner,
    SCLPruner,
    SNIPPruner,
    SRSTEPruner,
)


def test_phases_per_method():
    han = plan_phases("han", lr=0.1, steps_per_epoch=100, epochs=20, rounds=3, retrain_epochs=4)
    assert [(p.name, p.epochs, p.prune, p.fresh_optimizer) for p in han] == [
        ("dense", 20, False, False), ("round 1", 4, True, True), ("round 2", 4, True, True),
        ("round 3", 4, True, True)]  # fmt: skip
    assert han[0].warmup == 100 and han[1].lr == pytest.approx(0.01)
    glob = plan_phases("global", lr=0.1, steps_per_epoch=100, total_epochs=6, prune_at=0.6)
    assert [(p.epochs, p.prune) for p in glob] == [(4, False), (2, True)]
    assert glob[0].warmup == 60  # min(1 epoch, 1/10 of the budget)
    for m in ("gradual", "snip", "rigl"):
        (ph,) = plan_phases(m, lr=0.1, steps_per_epoch=10, total_epochs=3)
        assert ph.epochs == 3 and ph.prune == (m != "gradual") and not ph.fresh_optimizer
    with pytest.raises(ValueError, match="expected a method in"):
        plan_phases("magic", lr=0.1, steps_per_epoch=1)


def test_build_pruner_for_every_method():
    want = {"han": HanPruner, "global": GlobalMagnitudePruner, "gradual": GradualPruner,
            "snip": SNIPPruner, "rigl": RigLPruner, "nm": NMPruner, "scl": SCLPruner,
            "nmdecay": NMDecayPruner, "nmstruct": NMDecayPruner, "srste": SRSTEPruner,
            "gap": GaPPruner, "gibbs": GibbsPruner, "earlycrop": EarlyCROPPruner}  # fmt: skip
    for method in METHODS:
        model = build_model("lenet300")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        p = build_pruner(method, model, opt, total_steps=1000, sparsity=0.9, gradual_freq=100)
        assert type(p) is want[method] and p.optimizer is opt
        assert p.regularization == "l2" and p.reg_strength == 5e-4  # the same for every method
    g = build_pruner("gradual", model, opt, total_steps=1000, sparsity=0.9, gradual_start=0.1,
                     gradual_end=0.6, gradual_freq=100)  # fmt: skip
    assert (g.schedule.begin, g.schedule.end, g.schedule.every) == (100, 600, 100)
    assert nm_for_sparsity(0.9) == (1, 10) and nm_for_sparsity(0.95) == (1, 20)
    assert build_pruner("nm", model, opt, total_steps=10, sparsity=0.5).m == 2
    with pytest.raises(ValueError, match="needs a sparsity"):
        build_pruner("snip", model, opt, total_steps=10)


def test_mask_learning_recipes_keep_their_papers_defaults():
    for m in ("scl", "gap", "gibbs", "earlycrop", "nmdecay", "nmstruct"):
        (ph,) = plan_phases(m, lr=0.1, steps_per_epoch=10, total_epochs=4)
        assert ph.epochs == 4 and ph.prune == (m == "gap") and not ph.fresh_optimizer
    (ph,) = plan_phases("srste", lr=0.1, steps_per_epoch=10, total_epochs=4)
    assert ph.prune  # SR-STE trains N:M-sparse from step 0
    model = build_model("lenet300")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(total_steps=1000, sparsity=0.9)
    assert build_pruner("srste", model, opt, **kw).decay == 2e-4
    assert (
        build_pruner("srste", model, opt, **kw).n,
        build_pruner("srste", model, opt, **kw).m,
    ) == (1, 10)
    d = build_pruner("nmdecay", model, opt, nm=(2, 4), **kw)
    assert (d.n, d.m, d.recipe, d.end_step, d.decay_steps) == (2, 4, "mask", 750, 10)
    st = build_pruner("nmstruct", model, opt, **kw)
    assert (st.recipe, st.n, st.m) == ("structure", 1, 10)
    assert build_pruner("gap", model, opt, gap_interval=0.05, **kw).interval == 50
    assert build_pruner("scl", model, opt, **kw).end_step == 750
    assert build_pruner("gibbs", model, opt, **kw).end_step == 750
    assert build_pruner("earlycrop", model, opt, crop_max_epoch=20, **kw).max_epoch == 20
    assert recipes.crop_latest_epoch(0.5, 40) == 20 and recipes.crop_latest_epoch(0.5, 1) == 1
