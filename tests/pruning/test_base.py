"""The BasePruner contract, checked on every pruner: one construction signature, step() returns
whether a mask changed, prune() with the common signature, regularization_loss() zero unless the
method regularises, state_dict() through torch.save / weights_only load, a changed configuration
refused on resume, bad input refused with the model untouched."""

import io

import pytest
import torch
import torch.nn.functional as F

from sparsekern.nn import sparsify
from sparsekern.pruning import (
    BasePruner,
    BlockPruner,
    GlobalMagnitudePruner,
    GradualPruner,
    HanPruner,
    NMPruner,
    OneShot,
    RigLPruner,
    SNIPPruner,
)
from tests.helpers import TinyNet as Net

pytestmark = pytest.mark.usefixtures("reference_path")

# method -> (constructor kwargs, a different configuration of the same class)
PRUNERS = {
    "han": (HanPruner, dict(sparsity=0.8), dict(sparsity=0.7)),
    "global": (GlobalMagnitudePruner, dict(sparsity=0.8), dict(sparsity=0.7)),
    "gradual": (
        GradualPruner,
        dict(sparsity=0.8, begin_step=1, end_step=3, frequency=1),
        dict(sparsity=0.8, begin_step=1, end_step=3, frequency=2),
    ),
    "snip": (SNIPPruner, dict(sparsity=0.8), dict(sparsity=0.7)),
    "rigl": (
        RigLPruner,
        dict(sparsity=0.8, total_steps=8, delta=2),
        dict(sparsity=0.8, total_steps=8),
    ),
    "nm": (NMPruner, dict(n_m=(1, 4)), dict(n_m=(2, 4))),
    "block": (
        BlockPruner,
        dict(sparsity=0.5, block_size=16),
        dict(sparsity=0.5, block_size=(16, 32)),
    ),
}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def _run(model, opt, pruner, steps):
    changes = []
    for i in range(steps):
        x, y = _batch(i)

        def closure(x=x, y=y):
            return F.cross_entropy(model(x), y)

        loss = closure() + pruner.regularization_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        changes.append(pruner.step(closure))
    return changes


def _masks(model):
    return {n: m.mask.clone() for n, m in model.named_modules() if hasattr(m, "mask")}


@pytest.mark.parametrize("method", list(PRUNERS))
def test_every_pruner_follows_the_lifecycle(method):
    cls, kw, other_kw = PRUNERS[method]
    model = sparsify(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = cls(model, opt, **kw)
    assert isinstance(pruner, BasePruner)
    assert all(bool(m.mask.all()) for m in pruner.layers.values())  # constructing changes nothing
    if method != "rigl":
        assert _run(model, opt, pruner, 1) in ([False], [True])
    x, y = _batch(9)
    target = 0.5 if method == "gradual" else None  # gradual's schedule is still at s_i = 0
    kept = pruner.prune(target, closure=lambda: F.cross_entropy(model(x), y))
    assert set(kept) == set(pruner.layers) and min(kept.values()) < 1.0
    assert pruner.rounds >= 1 and pruner.history[-1]["kept"] == kept
    changes = _run(model, opt, pruner, 4)
    assert all(isinstance(c, bool) for c in changes)
    for m in pruner.layers.values():  # the mask invariant, through momentum
        assert torch.all(m.weight[~m.mask] == 0)
        assert torch.all(opt.state[m.weight]["momentum_buffer"][~m.mask] == 0)
    if method != "han":  # zero by default; Han regularises (L2, Caffe's 5e-4)
        assert pruner.regularization_loss().item() == 0.0
    else:
        assert pruner.regularization_loss().item() > 0.0
    summary = pruner.finalize()
    assert summary["sparsity"] == pytest.approx(pruner.current_sparsity())

    # state_dict survives torch.save / torch.load(weights_only=True) and restores the counters
    buf = io.BytesIO()
    torch.save(pruner.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    again = cls(model, opt, **kw)
    again.load_state_dict(state)
    assert (again.steps, again.rounds, again.history) == (
        pruner.steps,
        pruner.rounds,
        pruner.history,
    )
    # another configuration of the same method is refused, naming what differs
    other = cls(model, opt, **other_kw)
    with pytest.raises(ValueError, match="saved with another configuration: .*saved"):
        other.load_state_dict(state)
    assert other.steps == 0


@pytest.mark.parametrize("method", list(PRUNERS))
def test_bad_targets_leave_the_model_untouched(method):
    cls, kw, _ = PRUNERS[method]
    model = sparsify(Net())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError)):
        cls(model, **{**kw, "sparsity": 1.5} if "sparsity" in kw else {"n_m": (5, 4)})
    pruner = cls(model, **kw)
    for bad in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises((ValueError, TypeError)):
            pruner.prune(bad)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert pruner.rounds == 0


def test_step_clock_schedule_prunes_in_step_and_reports_it():
    model = sparsify(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = GlobalMagnitudePruner(model, opt, schedule=OneShot(0.9, at=3))
    assert _run(model, opt, pruner, 5) == [False, False, True, False, False]
    assert pruner.current_sparsity() == pytest.approx(0.9, abs=1e-3)
    assert pruner.history[0]["step"] == 3


def test_round_clock_oneshot_and_dict_targets():
    model = sparsify(Net())
    pruner = HanPruner(model, schedule=OneShot({"fc1": 0.5}, clock="round"))
    kept = pruner.prune()
    assert abs(kept["fc1"] - 0.5) <= 2 / 1024 and kept["conv"] == 1.0
    with pytest.raises(TypeError, match="one sparsity for all layers"):
        GlobalMagnitudePruner(model, sparsity={"fc1": 0.5})
    with pytest.raises(KeyError, match="fc9"):
        HanPruner(model, sparsity={"fc9": 0.5})


def test_set_optimizer_checks_it_holds_the_weights():
    model = sparsify(Net())
    pruner = GlobalMagnitudePruner(model, sparsity=0.5)
    pruner.set_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"without \['fc1'"):
        pruner.set_optimizer(torch.optim.SGD([model.conv.weight], lr=0.1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        pruner.set_optimizer("sgd")
