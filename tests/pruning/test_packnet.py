"""PackNet (Mallya and Lazebnik 2018): older tasks bitwise unchanged after training newer ones, the
owners partition the weights, each task's share is the paper's (50% / 75% of the freed / last
unpruned), biases and BatchNorm frozen after task 0, and the state round trip."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import check_masks, sparsify
from sparsekern.pruning import PackNet
from sparsekern.pruning.packnet import FREE


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 32)

    def forward(self, x):
        return F.relu(self.fc(F.relu(self.bn(self.conv(x))).flatten(1)))


def _setup(num_tasks=4):
    torch.manual_seed(0)
    trunk = sparsify(Trunk())
    heads = nn.ModuleList(nn.Linear(32, 3) for _ in range(num_tasks))
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    return trunk, heads, opt, PackNet(trunk, opt, num_tasks=num_tasks)


def _train(trunk, head, opt, pn, steps, seed):
    g = torch.Generator().manual_seed(seed)
    trunk.train()
    for _ in range(steps):
        x = torch.randn(8, 1, 6, 6, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        loss = F.cross_entropy(head(trunk(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pn.step()


def _outputs(trunk, heads, pn, x):
    trunk.eval()
    out = {}
    with torch.no_grad():
        for j in range(pn.current_task + 1):
            with pn.task(j):
                out[j] = heads[j](trunk(x))
    return out


def _run(trunk, heads, opt, pn, tasks):
    x = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(99))
    seen = {}
    for t in range(tasks):
        pn.start_task()
        _train(trunk, heads[t], opt, pn, 5, seed=t)
        pn.prune()
        _train(trunk, heads[t], opt, pn, 3, seed=100 + t)  # the paper's short retraining
        now = _outputs(trunk, heads, pn, x)
        for j, y in seen.items():
            assert torch.equal(now[j], y), f"task {j} changed after training task {t}"
        seen[t] = now[t]
    return seen


def test_old_tasks_bitwise_unchanged_and_owners_partition():
    trunk, heads, opt, pn = _setup(4)
    _run(trunk, heads, opt, pn, 4)
    assert not check_masks(trunk)
    for n, m in pn.layers.items():
        o = pn.owner[n]
        assert int(o.min()) >= FREE and int(o.max()) <= 3
        # each weight belongs to one task or none; the mask keeps exactly the owned ones
        assert torch.equal(m.mask, o >= 0)
        assert int(m.weight[o == FREE].count_nonzero()) == 0
        # per-task shares, per layer: 50% after task 0, then 75% of the freed weights pruned
        total = o.numel()
        n0 = round(0.5 * total)
        n1 = round(0.25 * (total - n0))
        n2 = round(0.25 * (total - n0 - n1))
        n3 = total - n0 - n1 - n2  # last task: unpruned
        got = [int((o == t).sum()) for t in range(4)]
        assert got == [n0, n1, n2, n3], (n, got)


def test_frozen_gradients_bias_and_batchnorm():
    trunk, heads, opt, pn = _setup(3)
    pn.start_task()
    _train(trunk, heads[0], opt, pn, 3, seed=0)
    pn.prune()
    bn_stats = trunk.bn.running_mean.clone()
    pn.start_task()
    assert not trunk.fc.bias.requires_grad and not trunk.bn.weight.requires_grad
    x = torch.randn(8, 1, 6, 6)
    trunk.train()
    loss = heads[1](trunk(x)).square().sum()
    opt.zero_grad()
    loss.backward()
    g, o = trunk.fc.weight.grad, pn.owner["fc"]
    assert int(g[o != 1].count_nonzero()) == 0  # only task 1's weights learn
    assert int(g[o == 1].count_nonzero()) > 0
    assert torch.equal(trunk.bn.running_mean, bn_stats)  # BN runs in eval mode now


def test_default_fractions_and_refusals():
    trunk, heads, opt, pn = _setup(2)
    with pytest.raises(ValueError, match="start_task"):
        pn.prune()
    pn.start_task()
    assert pn.default_fraction() == 0.5
    pn.prune()
    pn.start_task()
    assert pn.default_fraction() == 0.0  # the last task is left unpruned
    with pytest.raises(ValueError, match="num_tasks=2"):
        pn.start_task()
    with pytest.raises(ValueError, match="task in"), pn.task(5):
        pass
    with pytest.raises(ValueError, match="prune_first"):
        PackNet(trunk, None, sparsity=0.5)


def test_state_dict_round_trip_and_model_for_task():
    trunk, heads, opt, pn = _setup(3)
    _run(trunk, heads, opt, pn, 2)
    state = pn.state_dict()
    buf = __import__("io").BytesIO()
    torch.save({"pruner": state, "model": trunk.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    torch.manual_seed(1)
    trunk2 = sparsify(Trunk())
    trunk2.load_state_dict(loaded["model"])
    opt2 = torch.optim.SGD(trunk2.parameters(), lr=0.05)
    pn2 = PackNet(trunk2, opt2, num_tasks=3)
    pn2.load_state_dict(loaded["pruner"])
    assert pn2.current_task == 1 and pn2.steps == pn.steps
    for n in pn.owner:
        assert torch.equal(pn.owner[n], pn2.owner[n])
    x = torch.randn(4, 1, 6, 6)
    trunk.eval()
    trunk2.eval()
    with torch.no_grad():
        for j in range(2):
            with pn.task(j), pn2.task(j):
                assert torch.equal(trunk(x), trunk2(x))
        net0 = pn.model_for_task(0).eval()
        with pn.task(0):
            assert torch.equal(net0(x), trunk(x))
    assert int(net0.fc.weight[pn.owner["fc"] != 0].count_nonzero()) == 0
    bad = dict(state, owner={"fc": state["owner"]["fc"]}, steps=0)
    with pytest.raises(ValueError, match="owner"):
        pn2.load_state_dict(bad)
    assert pn2.steps == pn.steps  # a refused load changes nothing
