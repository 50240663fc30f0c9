"""GaP (Ma et al. 2022): layers in k groups, sparse start, one group dense at a time in turn,
pruned back by magnitude to exactly the target; exact at the end; resume."""

import pytest
import torch

from sparsekern.nn import check_masks
from sparsekern.pruning import GaPPruner
from sparsekern.pruning.gap import partition_layers
from tests.pruning.learned_helpers import FAMILIES, check_resume, lenet, train

pytestmark = pytest.mark.usefixtures("reference_path")


def dense_layers(pruner):
    return {n for n, m in pruner.layers.items() if bool(m.mask.all())}


def exact(pruner, names):
    for n in names:
        m = pruner.layers[n]
        assert int(m.mask.sum()) == round(0.1 * m.mask.numel()), n


def test_partition_covers_in_order():
    model, _ = lenet("5")
    layers = GaPPruner(model, sparsity=0.9, interval=1, end_step=4).layers
    groups = partition_layers(layers, 2)
    assert [n for g in groups for n in g] == list(layers)
    assert groups == [["conv1", "conv2", "fc1"], ["fc2"]] or groups == [
        ["conv1", "conv2"],
        ["fc1", "fc2"],
    ]
    assert len(partition_layers(layers, 10)) == 4  # at most one group per layer


def test_dense_group_rotates_and_prunes_back_by_magnitude():
    model, closure = lenet("5")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    groups = [["conv1", "conv2"], ["fc1"], ["fc2"]]
    pruner = GaPPruner(model, opt, sparsity=0.9, interval=2, groups=groups, end_step=8)
    w0 = {n: m.weight.detach().clone() for n, m in pruner.layers.items()}
    pruner.prune()
    assert dense_layers(pruner) == {"conv1", "conv2"}
    assert torch.equal(pruner.layers["conv1"].weight.detach(), w0["conv1"])  # kept its init
    exact(pruner, ["fc1", "fc2"])
    seen = []
    for _ in range(8):
        loss = closure()
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = {n: m.weight.detach().clone() for n, m in pruner.layers.items()}
        dense_before = pruner.dense_group
        pruner.step()
        assert check_masks(model) == []
        seen.append((pruner.steps, pruner.dense_group, sorted(dense_layers(pruner))))
        if pruner.steps % 2 == 0:
            # the group that was dense is now at the target, keeping its largest |w|
            for n in groups[dense_before]:
                m = pruner.layers[n]
                k = round(0.1 * m.mask.numel())
                thresh = before[n].abs().flatten().kthvalue(m.mask.numel() - k + 1).values
                assert int(m.mask.sum()) == k
                assert bool((before[n].abs()[m.mask] >= thresh).all())
    assert [s[1] for s in seen] == [0, 1, 1, 2, 2, 0, 0, None]
    assert seen[2][2] == ["fc1"] and seen[4][2] == ["fc2"] and seen[6][2] == ["conv1", "conv2"]
    assert dense_layers(pruner) == set()
    exact(pruner, pruner.layers)
    assert pruner.current_sparsity() == pytest.approx(0.9, abs=1e-4)
    assert check_masks(model) == []
    train(model, pruner, opt, closure, 2)  # frozen afterwards
    exact(pruner, pruner.layers)


def test_needs_prune_first_and_groups_checked():
    model, closure = lenet("300")
    pruner = GaPPruner(model, sparsity=0.9, interval=2, total_steps=20)
    assert pruner.end_step == 14
    with pytest.raises(RuntimeError, match="prune"):
        pruner.step()
    with pytest.raises(ValueError, match="groups"):
        GaPPruner(model, sparsity=0.9, interval=2, groups=[["fc1"]], end_step=4)


def test_resume_same_trajectory():
    check_resume(lambda: lenet("300"),
                 lambda m, o: GaPPruner(m, o, sparsity=0.9, interval=2, groups=3, end_step=8),
                 3, 4, start=lambda p, c: p.prune())  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runs_on_model_families(family):
    model, closure = FAMILIES[family]()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = GaPPruner(model, opt, sparsity=0.8, interval=1, groups=2, end_step=2)
    pruner.prune()
    train(model, pruner, opt, closure, 2)
    for m in pruner.layers.values():
        assert int(m.mask.sum()) == round(0.2 * m.mask.numel())


def test_non_finite_weight_is_an_error_naming_the_layer():
    model, _ = lenet("300")
    pruner = GaPPruner(model, sparsity=0.9, interval=2, end_step=4)
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    masks = [m.mask.clone() for m in pruner.layers.values()]
    with pytest.raises(ValueError, match="fc2"):
        pruner.prune()
    assert all(torch.equal(a, m.mask) for a, m in zip(masks, pruner.layers.values()))
