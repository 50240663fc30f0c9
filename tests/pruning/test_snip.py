"""SNIP: the scores are |g * w| with g the dense gradient; the global top-k of them is kept."""

import pytest
import torch
import torch.nn.functional as F

from sparsekern.nn import set_mask, sparsify
from sparsekern.pruning import SNIPPruner, snip_masks, snip_scores, sparse_layers
from tests.helpers import TinyNet as Net

# The plain-PyTorch CPU path (fast); the kernels have their own tests.
pytestmark = pytest.mark.usefixtures("reference_path")


def _batches(n, device):
    g = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(8, 1, 6, 6, generator=g).to(device),
            torch.randint(0, 4, (8,), generator=g).to(device),
        )
        for _ in range(n)
    ]


def test_scores_are_dense_g_times_w(device):
    torch.manual_seed(0)
    dense = Net().to(device)
    model = sparsify(Net()).to(device)
    model.load_state_dict(dense.state_dict())
    # a mask that is not all True: SNIP's gradient must still be the dense one
    set_mask(model.fc1, torch.rand(16, 64, device=device) > 0.5)
    with torch.no_grad():
        dense.fc1.weight.copy_(model.fc1.weight)
    batches = _batches(2, device)
    grads = [
        torch.autograd.grad(F.cross_entropy(dense(x), y), [dense.conv.weight, dense.fc1.weight,
                                                           dense.fc2.weight])
        for x, y in batches
    ]  # fmt: skip
    want = [((a + b) / 2 * w).abs() for a, b, w in zip(*grads, [dense.conv.weight,
            dense.fc1.weight, dense.fc2.weight])]  # fmt: skip
    got = snip_scores(sparse_layers(model), lambda b: F.cross_entropy(model(b[0]), b[1]), batches)
    for g, w in zip(got.values(), want):
        torch.testing.assert_close(g, w.detach().float(), rtol=1e-5, atol=1e-7)
    assert model.fc1.weight.grad is None  # the optimizer's .grad fields are not touched


def test_picks_largest_scores_globally(device):
    model = sparsify(Net()).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = SNIPPruner(model, opt, sparsity=0.9)
    ((xb, yb),) = _batches(1, device)
    with pytest.raises(ValueError, match="expected a closure"):
        pruner.prune()
    assert all(bool(m.mask.all()) for m in pruner.layers.values())  # untouched on error
    kept = pruner.prune(closure=lambda: F.cross_entropy(model(xb), yb))
    assert set(kept) == {"conv", "fc1", "fc2"}
    total = sum(m.weight.numel() for m in pruner.layers.values())
    assert int(sum(m.mask.sum() for m in pruner.layers.values())) == round(0.1 * total)
    s = torch.cat([pruner.scores[n].flatten() for n in pruner.layers])
    k = torch.cat([pruner.layers[n].mask.flatten() for n in pruner.layers])
    assert s[k].min() >= s[~k].max()  # every kept score >= every pruned one
    # then it trains sparse for a few steps; pruned weights stay at zero
    for x, y in _batches(3, device):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    for m in pruner.layers.values():
        assert torch.all(m.weight[~m.mask] == 0)
    assert pruner.steps == 3


def test_snip_masks_by_hand():
    scores = {"a": torch.tensor([[0.1, 0.9], [0.5, 0.2]]), "b": torch.tensor([[0.8, 0.05]])}
    masks = snip_masks(scores, density=0.5)  # 3 of 6: 0.9, 0.8, 0.5
    assert masks["a"].tolist() == [[False, True], [True, False]]
    assert masks["b"].tolist() == [[True, False]]
    with pytest.raises(ValueError, match="density in"):
        snip_masks(scores, density=2.0)
    with pytest.raises(ValueError, match="at least one batch"):
        snip_scores(sparse_layers(sparsify(Net())), lambda b: b, [])
