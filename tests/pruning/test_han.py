"""HanPruner: prepare / prune / regularise / freeze / finalize, iterative schedules."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import sparsify
from sparsekern.pruning import Geometric, HanPruner


class Net(nn.Module):
    """conv(1->3, 3x3) -> relu -> flatten -> fc1(48->12) -> relu -> drop -> fc2(12->4).
    Input [B, 1, 6, 6]."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc1 = nn.Linear(48, 12)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x):
        x = F.relu(self.conv(x)).flatten(1)
        return self.fc2(self.drop(F.relu(self.fc1(x))))


def _net(dtype=torch.float64, p=0.5):
    return sparsify(Net(p)).to(dtype)


def _train(model, opt, pruner=None, steps=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    dev = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(8, 1, 6, 6, generator=g, dtype=dtype).to(dev)
        y = torch.randint(0, 4, (8,), generator=g).to(dev)
        loss = F.cross_entropy(model(x), y)
        if pruner is not None:
            loss = loss + pruner.regularization_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pruner is not None:
            pruner.step()


def _masks(model):
    return {n: m.mask.clone() for n, m in model.named_modules() if hasattr(m, "mask")}


def test_prepare_and_one_round():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt)
    pruner = HanPruner(model, opt, quality={"conv": 0.3, "fc": 1.0})
    assert pruner.prepare() == {"conv": 27, "fc1": 576, "fc2": 48}
    before = {n: m.weight.detach().clone() for n, m in pruner.layers.items()}
    kept = pruner.prune()
    assert pruner.rounds == 1 and pruner.history[0]["kept"] == kept
    assert pruner.history[0]["quality"] == {"conv": 0.3, "fc": 1.0}
    for n, m in pruner.layers.items():
        assert kept[n] == m.mask.sum().item() / m.mask.numel()
        # survivors are never re-initialised; pruned weights and their momentum are zero
        assert torch.equal(m.weight[m.mask], before[n][m.mask])
        assert (m.weight[~m.mask] == 0).all()
        assert (opt.state[m.weight]["momentum_buffer"][~m.mask] == 0).all()
    assert kept["fc1"] < kept["conv"] < 1.0
    assert pruner.original_connections == {"conv": 27, "fc1": 576, "fc2": 48}


def test_iterative_quality_rounds_are_monotone_and_retraining_keeps_zeros():
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt)
    pruner = HanPruner(model, opt, quality=0.5)
    pruner.prepare()
    masks = _masks(model)
    totals = []
    for q in [0.3, 0.5, 0.5, 0.8, 0.8]:
        pruner.prune(quality=q)  # a constant quality still prunes further: the std grows
        new = _masks(model)
        for n in new:
            assert not (new[n] & ~masks[n]).any(), "a pruned weight came back"
        masks = new
        _train(model, opt, pruner)  # retrain: Adam moments were zeroed at pruned entries
        for m in pruner.layers.values():
            assert (m.weight[~m.mask] == 0).all()
            assert (opt.state[m.weight]["exp_avg"][~m.mask] == 0).all()
        totals.append(sum(int(m.sum()) for m in masks.values()))
    assert all(a > b for a, b in zip(totals, totals[1:]))


def test_geometric_schedule_reaches_per_layer_targets():
    sched = Geometric(0.92, 3)  # Han: every round removes the same fraction of what is left
    assert sched.clock == "round" and [sched.is_update(t) for t in range(5)] == [
        False, True, True, True, False
    ]  # fmt: skip
    kept = [1 - sched(t) for t in (1, 2, 3)]
    assert kept == pytest.approx([0.08 ** (1 / 3), 0.08 ** (2 / 3), 0.08])
    assert sched(3) == 0.92 and sched(7) == 0.92  # exactly the target, and stays there
    per = Geometric({"fc": 0.9, "conv": 0.5}, 2)
    assert per(2) == {"fc": 0.9, "conv": 0.5}
    model = _net()
    pruner = HanPruner(model, schedule=Geometric({"fc1": 0.92}, 3))
    for r in range(3):
        kept = pruner.prune()  # round r + 1 of the schedule
        assert abs(kept["fc1"] - 0.08 ** ((r + 1) / 3)) <= 2 / 576
        assert kept["conv"] == 1.0 and kept["fc2"] == 1.0  # not covered: left alone
    assert [h["target"] for h in pruner.history] == [
        Geometric({"fc1": 0.92}, 3)(t) for t in (1, 2, 3)
    ]
    kept = pruner.prune(sparsity={"fc2": 0.5})  # an explicit target overrides the schedule
    assert abs(kept["fc2"] - 0.5) <= 2 / 48
    with pytest.raises(ValueError, match="both"):
        pruner.prune(quality=1.0, sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity or schedule"):
        HanPruner(model, sparsity=0.5, schedule=sched)
    with pytest.raises(ValueError, match="expected a target"):
        HanPruner(_net()).prune()


def test_min_density_floor():
    model = _net()
    pruner = HanPruner(model, quality=1.5, min_density=0.05)
    for _ in range(4):  # a constant 1.5 would empty the layers of uniform init weights
        kept = pruner.prune()
    for n, m in pruner.layers.items():
        assert int(m.mask.sum()) == math.ceil(0.05 * m.mask.numel()), n
    bare = HanPruner(_net(), quality=1.5, min_density=0)  # pure Han
    for _ in range(3):
        kept = bare.prune()
    assert min(kept.values()) == 0.0  # what the floor prevents
    default = HanPruner(_net(), quality=1.5)  # the default floor: 1% and one weight, warned
    with pytest.warns(RuntimeWarning, match="min_density floor"):
        for _ in range(3):
            kept = default.prune()
    for n, m in default.layers.items():
        assert int(m.mask.sum()) >= max(1, math.ceil(0.01 * m.mask.numel())), n


def test_dropout_follows_kept_connections():
    model = _net(p=0.5)
    pruner = HanPruner(model, quality={"fc2": 0.8})
    pruner.prepare()
    assert pruner.dropout_feeds == {"drop": "fc2"}
    for _ in range(2):
        pruner.prune()
        c_r = int(model.fc2.mask.sum())
        # always from the original p and C_io, never compounded
        assert model.drop.p == pytest.approx(0.5 * math.sqrt(c_r / 48))
    summary = pruner.finalize()
    assert summary["dropout"] == {"drop": model.drop.p}
    off = HanPruner(_net(p=0.5), quality=1.0, dropout=False)
    off.prune()
    assert off.model.drop.p == 0.5


def test_regularization_loss_values_and_gradients():
    model = _net()
    pruner = HanPruner(model, quality=0.8, regularization="l2", reg_strength=0.1)
    pruner.prune()
    ws = [(m.weight * m.mask).detach() for m in pruner.layers.values()]
    l2 = pruner.regularization_loss()
    assert l2.detach().item() == pytest.approx(0.05 * sum(float(w.pow(2).sum()) for w in ws))
    l2.backward()
    for m in pruner.layers.values():
        assert torch.equal(m.weight.grad, 0.1 * m.weight.detach() * m.mask)  # Caffe's decay
        assert (m.weight.grad[~m.mask] == 0).all()
        m.weight.grad = None
    pruner.regularization = "l1"
    l1 = pruner.regularization_loss()
    assert l1.detach().item() == pytest.approx(0.1 * sum(float(w.abs().sum()) for w in ws))
    pruner.regularization = "none"
    assert pruner.regularization_loss().item() == 0.0
    with pytest.raises(ValueError, match="'l3'"):
        HanPruner(model, regularization="l3")


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_freeze_conv_then_fc(opt_name, device):
    # float32: the masked_linear Triton kernels (interpreter on CPU) do the FC layers
    model = _net(torch.float32).to(device)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    _train(model, opt, dtype=torch.float32, steps=2)  # momentum / moments exist everywhere
    pruner = HanPruner(model, opt, quality=0.5)
    pruner.prune()
    assert pruner.freeze("conv") == ["conv"]
    conv_w, conv_b = model.conv.weight.detach().clone(), model.conv.bias.detach().clone()
    fc_w = model.fc1.weight.detach().clone()
    _train(model, opt, pruner, dtype=torch.float32, steps=2)
    assert torch.equal(model.conv.weight, conv_w) and torch.equal(model.conv.bias, conv_b)
    assert model.conv.weight.grad is None
    assert not torch.equal(model.fc1.weight, fc_w)
    assert pruner.regularization_loss().requires_grad  # fc layers still regularised
    # switch: FC frozen, conv trains
    assert pruner.freeze("fc") == ["fc1", "fc2"]
    assert model.conv.weight.requires_grad
    fc1_w, fc2_b = model.fc1.weight.detach().clone(), model.fc2.bias.detach().clone()
    _train(model, opt, pruner, dtype=torch.float32, steps=2)
    assert torch.equal(model.fc1.weight, fc1_w) and torch.equal(model.fc2.bias, fc2_b)
    assert not torch.equal(model.conv.weight, conv_w)
    assert (model.conv.weight[~model.conv.mask] == 0).all()
    pruner.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="'attention'"):
        pruner.freeze("attention")


def test_finalize_state_dict_and_errors():
    model = _net()
    pruner = HanPruner(model, quality=0.7)
    pruner.prune()
    pruner.freeze("fc")
    summary = pruner.finalize()
    assert all(p.requires_grad for p in model.parameters())  # finalize unfreezes
    assert summary["rounds"] == 1
    total = sum(summary["original_connections"].values())
    assert summary["total_kept"] == pytest.approx(sum(summary["connections"].values()) / total)
    assert summary["compression"] == pytest.approx(1 / summary["total_kept"])
    state = pruner.state_dict()
    again = HanPruner(model, quality=0.7)
    again.load_state_dict(state)
    assert again.rounds == 1 and again.history == pruner.history
    assert again.original_connections == pruner.original_connections
    # a resume with other hyperparameters is refused, naming the difference; nothing changes
    other = HanPruner(model, quality=0.9)
    with pytest.raises(ValueError, match=r"quality: saved 0.7, now 0.9"):
        other.load_state_dict(state)
    assert other.rounds == 0
    with pytest.raises(ValueError, match="expected the state of a HanPruner, got a"):
        other.load_state_dict(dict(state, pruner="RigLPruner"))
    with pytest.raises(KeyError, match="fc9"):
        HanPruner(model, quality={"fc9": 1.0})
    with pytest.raises(KeyError, match="fc9"):
        HanPruner(model, schedule=Geometric({"fc9": 0.5}, 2))
    with pytest.raises(ValueError, match="sparsify"):
        HanPruner(Net())


def test_state_dict_restores_the_dropout_rule():
    model = _net(p=0.5)
    pruner = HanPruner(model, quality={"fc2": 0.8})
    pruner.prune()
    state, masks = pruner.state_dict(), model.state_dict()
    fresh = _net(p=0.5)  # a resumed run: a new model, p back at 0.5
    fresh.load_state_dict(masks)
    again = HanPruner(fresh, quality={"fc2": 0.8})
    again.load_state_dict(state)
    assert fresh.drop.p == model.drop.p < 0.5  # the adjusted p, not the constructor's
    assert again.original_dropout == {"drop": 0.5}
