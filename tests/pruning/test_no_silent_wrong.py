"""No silent wrong result in sparsekern.pruning (issue 25, item 6): non-finite weights, emptied
layers, optimizers that break the mask invariant, arguments that would be ignored, bad
calibration, an optimizer the pruner was not given. Each case is refused or warned, with the
model untouched where it is refused."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import check_masks
from sparsekern.nn import sparsify
from sparsekern.pruning import (
    BlockPruner,
    CosineDecay,
    GlobalMagnitudePruner,
    GradualPruner,
    HanPruner,
    check_nm,
    magnitude_mask,
    one_shot,
    prune_blocks_,
    prune_model_,
)
from tests.helpers import TinyNet as Net

pytestmark = pytest.mark.usefixtures("reference_path")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _unchanged(model, before):
    now = model.state_dict()
    return now.keys() == before.keys() and all(_same(now[k], before[k]) for k in now)


def _batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def _steps(model, opt, n, start=0):
    for i in range(start, start + n):
        x, y = _batch(i)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


# ------------------------------------------------------------------ non-finite weights
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_an_error_naming_the_layer(bad):
    model = sparsify(Net())
    with torch.no_grad():
        model.fc1.weight[3, 5] = bad
    before = _state(model)
    with pytest.raises(ValueError, match="finite.*'fc1'"):
        HanPruner(model, quality=0.5).prune()
    with pytest.raises(ValueError, match="finite.*'fc1'"):  # not "quality" blamed
        HanPruner(model, sparsity=0.9).prune()
    with pytest.raises(ValueError, match="finite.*'fc1'"):
        prune_model_(model, 0.5)
    with pytest.raises(ValueError, match="finite.*'fc1'"):
        GlobalMagnitudePruner(model, sparsity=0.9).prune()
    with pytest.raises(ValueError, match="finite"):
        magnitude_mask(model.fc1.weight, model.fc1.mask, 0.5)
    assert _unchanged(model, before)


# ------------------------------------------------------------------ emptied layers
def test_block_pruning_keeps_a_block_where_the_target_rounds_to_none():
    model = sparsify(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)))
    # one 128x128 block covers a whole 64x32 layer: round(0.5 * 1) == 0 blocks would empty it
    with pytest.warns(RuntimeWarning, match="min_density floor keeps more blocks"):
        BlockPruner(model, sparsity=0.5, block_size=128).prune()
    assert all(bool(m.mask.any()) for m in (model[0], model[2]))
    clf = sparsify(nn.Sequential(nn.Linear(32, 10)))
    # a 10x32 classifier in 16x16 blocks: 2 blocks, round(0.1 * 2) == 0
    with pytest.warns(RuntimeWarning, match=r"0 \(1 of 2 blocks kept, target 0\)"):
        kept = prune_blocks_(clf, density=0.1, block_size=16)
    assert kept["0"] > 0
    bare = sparsify(nn.Sequential(nn.Linear(32, 10)))
    with pytest.warns(RuntimeWarning, match="keep no weight"):  # asked for: warned, not hidden
        prune_blocks_(bare, density=0.1, block_size=16, min_density=0)


# ------------------------------------------------------------------ optimizers
def test_non_elementwise_optimizers_are_refused():
    model = sparsify(Net())
    with pytest.raises(ValueError, match="elementwise.*LBFGS"):
        GlobalMagnitudePruner(model, torch.optim.LBFGS(model.parameters()), sparsity=0.5)
    if hasattr(torch.optim, "Muon"):
        muon = torch.optim.Muon([model.fc1.weight, model.fc2.weight])
        with pytest.raises(ValueError, match="elementwise.*Muon"):
            GlobalMagnitudePruner(model, muon, sparsity=0.5, layers=["fc1", "fc2"])


def test_lbfgs_history_from_before_pruning_is_refused_even_when_not_passed():
    model = sparsify(Net())
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2)
    x, y = _batch(0)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    with pytest.raises(ValueError, match="elementwise.*LBFGS"):
        GlobalMagnitudePruner(model, sparsity=0.9)


def test_an_optimizer_of_unknown_kind_is_warned_about():
    class Mine(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

    model = sparsify(Net())
    with pytest.warns(RuntimeWarning, match="cannot tell whether Mine"):
        GlobalMagnitudePruner(model, Mine(model.parameters()), sparsity=0.5)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_pruner_without_the_optimizer_does_not_revive_pruned_weights(make):
    model = sparsify(Net())
    opt = make(model.parameters())
    _steps(model, opt, 3)  # dense steps: momentum / moments everywhere
    with pytest.warns(RuntimeWarning, match="not passed to the pruner holds state"):
        pruner = GlobalMagnitudePruner(model, sparsity=0.9)  # the optimizer not given
    pruner.prune()
    _steps(model, opt, 3, start=3)
    assert check_masks(model) == []  # before: every pruned weight moved off zero
    assert pruner.finalize()["sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_an_optimizer_made_after_the_pruner_is_synced_too():
    model = sparsify(Net())
    pruner = GradualPruner(model, sparsity=0.8, begin_step=2, end_step=4, frequency=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pytest.warns(RuntimeWarning, match="SGD that was not passed"):
        for i in range(6):
            _steps(model, opt, 1, start=i)
            pruner.step()
    assert check_masks(model) == []


# ------------------------------------------------------------------ ignored arguments
def test_han_quality_with_a_sparsity_target_is_refused():
    with pytest.raises(ValueError, match="quality or sparsity, got both"):
        HanPruner(sparsify(Net()), quality=0.1, sparsity=0.9)


def test_prune_below_the_reached_sparsity_is_refused():
    model = sparsify(Net())
    pruner = GlobalMagnitudePruner(model, sparsity=0.9)
    pruner.prune(0.9)
    before = _state(model)
    with pytest.raises(ValueError, match=r"expected a sparsity >= 0.9.*got 0.5"):
        pruner.prune(0.5)
    assert _unchanged(model, before) and pruner.rounds == 1
    pruner.prune(0.9)  # the same target again is fine (nothing to do)
    han = HanPruner(model, sparsity={"fc1": 0.9})
    with pytest.raises(ValueError, match="fc1"):
        han.prune({"fc1": 0.5})


def test_cosine_decay_with_end_zero_is_refused():
    with pytest.raises(ValueError, match="end: expected an integer >= 1, got 0"):
        CosineDecay(0.3, end=0)


@pytest.mark.parametrize(
    "key,value", [("steps", -5), ("rounds", -1), ("steps", 2.5), ("history", None)]
)
def test_load_state_dict_refuses_bad_counters(key, value):
    model = sparsify(Net())
    pruner = GlobalMagnitudePruner(model, sparsity=0.5)
    pruner.prune()
    state = pruner.state_dict()
    state[key] = value
    fresh = GlobalMagnitudePruner(model, sparsity=0.5)
    with pytest.raises(ValueError, match=key):
        fresh.load_state_dict(state)
    assert fresh.steps == 0 and fresh.rounds == 0 and fresh.history == []


def test_check_nm_refuses_a_float_tensor():
    w = torch.randn(4, 8)
    with pytest.raises(TypeError, match="expected a torch.bool mask, got torch.float32"):
        check_nm(w, (2, 4))
    assert check_nm(torch.ones(4, 8, dtype=torch.bool), (4, 4))


# ------------------------------------------------------------------ one_shot calibration
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize(
    "calibration,match",
    [
        ([torch.randn(8, 15)], "batch 0 .*fails"),  # wrong width
        ([torch.randn(8, 16), torch.full((8, 16), float("nan"))], "NaN/inf in batch 1"),
        ([torch.randint(0, 5, (8, 16))], "batch 0 .*int64.*fails"),
        ([(torch.randn(8, 16), torch.randn(8, 16))], "batch 0 .*fails"),  # wrong arity
    ],
    ids=["width", "nan", "int", "arity"],
)
def test_one_shot_bad_calibration_leaves_the_model_untouched(calibration, match):
    model = _mlp()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=match):
        one_shot(model, calibration, "sparsegpt", 0.5)
    assert [type(m) for m in model] == [type(m) for m in before]  # nothing converted
    assert _unchanged(model, before.state_dict())


def test_one_shot_construction_failure_undoes_the_conversion():
    model = _mlp()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # not over every pruned layer
    with pytest.raises(ValueError, match="optimizer over every pruned layer"):
        one_shot(model, [torch.randn(8, 16)], optimizer=opt)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_nothing_warns_on_the_ordinary_path():
    model = sparsify(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner = GlobalMagnitudePruner(model, opt, sparsity=0.8)
        _steps(model, opt, 2)
        pruner.prune()
        _steps(model, opt, 2, start=2)
    assert check_masks(model) == []


def test_optimizer_scan_survives_dead_weakref_proxies():
    # gc.get_objects() yields weakref proxies too; isinstance on a dead one raises ReferenceError
    import gc
    import weakref

    from sparsekern.pruning._optim import optimizers_holding

    class Target:
        pass

    t = Target()
    proxy = weakref.proxy(t)
    del t
    gc.collect()
    holder = [proxy]  # the dead proxy stays reachable, so the scan meets it
    w = torch.nn.Parameter(torch.randn(3, 3))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    opt.state[w]["momentum_buffer"] = torch.ones_like(w)  # state, never stepped: not tracked
    assert opt in optimizers_holding([w], scan=True)
    assert len(holder) == 1
