"""RLS channel importance: the recursion of P = R^{-1} against the direct inverse, and the score
against a brute-force least-squares refit, in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.pruning._dependency import build_channel_graph
from sparsekern.pruning.importance_rls import (
    InputAutocorrelation,
    RecoveryGate,
    removal_error,
    rls_channel_scores,
    rls_update,
)
from sparsekern.pruning.structured import StructuredPruner, prune_channels, pruning_plan

D64 = torch.float64


@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("rows", [1, 3, 11])  # Sherman-Morrison, Woodbury (k < d), direct (k >= d)
def test_recursion_matches_direct_inverse(lam, rows):
    g = torch.Generator().manual_seed(rows)
    d, delta = 7, 0.5
    p = torch.eye(d, dtype=D64) / delta
    r = delta * torch.eye(d, dtype=D64)
    for _ in range(6):
        x = torch.randn(rows, d, generator=g, dtype=D64)
        p = rls_update(p, x, lam)
        r = lam * r + x.T @ x
    torch.testing.assert_close(p, torch.linalg.inv(r), rtol=1e-9, atol=1e-10)


def test_hooked_conv_rows_match_im2col_autocorrelation():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2).double()
    model = nn.Sequential(conv)
    xs = [torch.randn(2, 3, 5, 6, dtype=D64) for _ in range(3)]
    rls = InputAutocorrelation(model, ["0"], forgetting=0.95, delta=0.1)
    rls.observe([(x, None) for x in xs])
    r = 0.1 * torch.eye(27, dtype=D64)
    for x in xs:
        cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
        r = 0.95 * r + cols.T @ cols
    torch.testing.assert_close(rls.p["0"], torch.linalg.inv(r), rtol=1e-9, atol=1e-12)
    # the im2col rows are what the conv multiplies: conv(x) == rows @ W^T + b
    cols = F.unfold(xs[0], 3, padding=1, stride=2).transpose(1, 2).reshape(2, -1, 27)
    ref = (cols @ conv.weight.flatten(1).T + conv.bias).transpose(1, 2).reshape(2, 4, 3, 3)
    torch.testing.assert_close(conv(xs[0]), ref)


def _brute_force_increase(x, w, cols, delta):
    """min over W' with columns ``cols`` zero of ||X W^T - X W'^T||^2 + delta ||W - W'||^2,
    by least squares on the remaining columns ([X; sqrt(delta) I] rows)."""
    d = x.shape[1]
    a = torch.cat([x, delta**0.5 * torch.eye(d, dtype=D64)])  # [k + d, d]
    target = a @ w.T  # what the layer produces
    keep = [c for c in range(d) if c not in set(cols)]
    sol = torch.linalg.lstsq(a[:, keep], target).solution
    return float(((target - a[:, keep] @ sol) ** 2).sum())


def test_score_equals_brute_force_refit_error():
    g = torch.Generator().manual_seed(1)
    k, d, c_out, delta = 40, 6, 3, 1e-2
    x = torch.randn(k, d, generator=g, dtype=D64) @ torch.randn(d, d, generator=g, dtype=D64)
    w = torch.randn(c_out, d, generator=g, dtype=D64)
    p = rls_update(torch.eye(d, dtype=D64) / delta, x)
    for cols in ([0], [3], [1, 4], [0, 2, 5]):
        got = removal_error(w, p, torch.tensor(cols))
        assert got == pytest.approx(_brute_force_increase(x, w, cols, delta), rel=1e-8)


class Tiny(nn.Module):
    """conv 2->3 (producer of the pruned channels) -> ReLU -> flatten -> fc 12 -> 2."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 3), nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_channel_score_is_the_consumers_refit_error_and_ranks_pruning():
    torch.manual_seed(2)
    model = Tiny().double()
    xs = [torch.randn(8, 2, 4, 4, dtype=D64) for _ in range(2)]
    cg = build_channel_graph(model, (xs[0][:1],))
    rls = InputAutocorrelation(model, cg.consumers, delta=1e-3)
    rls.observe([(x, None) for x in xs])
    scores = rls_channel_scores(model, cg, rls)
    (group,) = cg.groups
    with torch.no_grad():  # [16, 12]: the fc inputs
        feats = torch.cat([torch.relu(model.conv(x)).flatten(1) for x in xs])
    w = model.fc.weight.detach()
    for c, r in enumerate(group.classes):  # channel c: the fc columns 4c .. 4c+3 (flatten)
        ref = _brute_force_increase(feats, w, list(range(4 * c, 4 * c + 4)), 1e-3)
        assert scores[r] == pytest.approx(ref, rel=1e-6)
    # prune_channels removes the lowest-scoring channel
    data = [(x, None) for x in xs]
    plan = pruning_plan(model, xs[0][:1], amount=0.34, importance="rls", data=data)
    lowest = min(range(3), key=lambda c: scores[group.classes[c]])
    assert plan["out"]["conv"].tolist() == [c != lowest for c in range(3)]
    small = prune_channels(model, xs[0][:1], amount=0.34, importance="rls", data=data)
    assert small.conv.out_channels == 2 and small.fc.in_features == 8


def test_pruner_with_rls_state_kept_during_training_and_refusals():
    from sparsekern.nn import sparsify

    torch.manual_seed(3)
    model = sparsify(Tiny())
    x = torch.randn(4, 2, 4, 4)
    with pytest.raises(ValueError, match="rls_state"):
        StructuredPruner(model, example_inputs=x[:1], importance="rls")
    cg = build_channel_graph(model, (x[:1],))
    rls = InputAutocorrelation(model)  # every conv and Linear: here the consumers
    assert sorted(rls.p) == sorted(cg.consumers) == ["conv", "fc"]
    with rls:  # P kept through "training" forwards
        for _ in range(3):
            model(torch.randn(4, 2, 4, 4)).sum().backward()
    p_before = {n: t.clone() for n, t in rls.p.items()}
    pruner = StructuredPruner(model, example_inputs=x[:1], importance="rls", rls_state=rls)
    pruner.prune(0.34)
    assert sum(len(v) for v in pruner.removed_channels().values()) == 1
    assert all(torch.equal(p_before[n], rls.p[n]) for n in rls.p)  # read, not changed
    assert pruner.export().conv.out_channels == 2
    with pytest.raises(ValueError, match="forgetting"):
        InputAutocorrelation(model, cg.consumers, forgetting=1.5)
    with pytest.raises(ValueError, match=r"P \[d, d\] and x \[k, d\]"):
        rls_update(torch.eye(3), torch.ones(2, 4))


def test_recovery_gate_waits_for_the_pre_pruning_accuracy():
    gate = RecoveryGate()
    assert gate.ready(0.97)
    gate.pruned(0.97)
    assert not gate.ready(0.90) and not gate.ready(0.969)
    assert gate.ready(0.97)
    gate.pruned(0.975)
    assert not gate.ready(0.97)
    assert RecoveryGate(tol=0.01).ready(0.5)
    with pytest.raises(ValueError, match="finite"):
        gate.ready(float("nan"))
