"""N:M masks: exactly N of every M along the input dimension (Linear and conv), the largest |w|
chosen, the pruner's lifecycle, and the 2:4 semi-structured export (skipped without a GPU)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import sparsify
from sparsekern.pruning import (
    NMPruner,
    SemiStructuredUnsupported,
    check_nm,
    export_semi_structured,
    nm_mask,
    semi_structured_support,
)
from tests.helpers import TinyNet as Net

# The plain-PyTorch CPU path (fast); the kernels have their own tests.
pytestmark = pytest.mark.usefixtures("reference_path")


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 10), (3, 7)])
@pytest.mark.parametrize(
    "shape", [(8, 16), (5, 28), (6, 3, 5, 5), (4, 2, 3, 3)]
)  # in dims 16, 28, 75, 18: divisible by M or not
def test_exactly_n_of_every_m(shape, n, m):
    w = torch.randn(shape)
    mask = nm_mask(w, (n, m))
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert check_nm(mask, (n, m))
    flat, k = mask.reshape(shape[0], -1), mask[0].numel()
    full = k // m
    counts = flat[:, : full * m].reshape(shape[0], full, m).sum(-1)
    assert torch.all(counts == n)
    if k % m:  # the last, shorter group keeps min(n, r)
        assert torch.all(flat[:, full * m :].sum(-1) == min(n, k % m))


def test_keeps_the_largest_in_each_group():
    w = torch.tensor([[0.1, -0.9, 0.3, 0.2, 5.0, 4.0, -6.0, 0.0]])
    assert nm_mask(w, (2, 4)).tolist() == [[False, True, True, False, True, False, True, False]]
    # conv [out, in, kh, kw]: groups along the flattened in * kh * kw
    c = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-8.0, 0.5], [0.1, 7.0]]]])  # [1, 2, 2, 2]
    assert nm_mask(c, (2, 4)).flatten().tolist() == [
        False,
        False,
        True,
        True,
        True,
        False,
        False,
        True,
    ]


def test_check_nm_rejects_other_patterns():
    mask = nm_mask(torch.randn(4, 8), (2, 4))
    assert not check_nm(mask, (1, 4))
    mask[0, 0] = ~mask[0, 0]
    assert not check_nm(mask, (2, 4))
    with pytest.raises(ValueError, match=r"1 <= n <= m, got \(5, 4\)"):
        nm_mask(torch.randn(4, 8), (5, 4))


def test_pruner_lifecycle(device):
    model = sparsify(Net()).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = NMPruner(model, opt, n_m=(2, 4))
    g = torch.Generator().manual_seed(0)

    def train(steps):
        for _ in range(steps):
            x = torch.randn(8, 1, 6, 6, generator=g).to(device)
            y = torch.randint(0, 4, (8,), generator=g).to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.step()

    train(2)
    kept = pruner.prune()
    assert kept["fc1"] == 0.5 and kept["fc2"] == 0.5
    assert kept["conv"] == pytest.approx(5 / 9)  # in*kh*kw = 9: 2 of 4, 2 of 4, 1 of 1
    train(3)  # the pattern stays and pruned weights stay at zero under momentum
    for m in pruner.layers.values():
        assert check_nm(m.mask, (2, 4))
        assert torch.all(m.weight[~m.mask] == 0)
        assert torch.all(opt.state[m.weight]["momentum_buffer"][~m.mask] == 0)
    assert pruner.finalize()["steps"] == 5
    assert pruner.sparsity == 0.5
    with pytest.raises(ValueError, match="expected the sparsity of 2:4"):
        pruner.prune(0.9)


def test_export_without_gpu_says_why():
    ok, reason = semi_structured_support()
    if ok:
        pytest.skip(f"a GPU that runs 2:4 is present ({reason}); see test_export_on_gpu")
    model = sparsify(nn.Sequential(nn.Linear(128, 64)))
    NMPruner(model, n_m=(2, 4)).prune()
    with pytest.raises(SemiStructuredUnsupported, match="skipped: "):
        export_semi_structured(model)


@pytest.mark.gpu
def test_export_on_gpu():
    ok, reason = semi_structured_support()
    if not ok:
        pytest.skip(f"2:4 export not supported here: {reason}")
    model = sparsify(nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))).cuda()
    NMPruner(model, n_m=(2, 4)).prune()
    fast, report = export_semi_structured(model.eval())
    assert report["0"] == "2:4 semi-structured"
    assert report["2"] != "2:4 semi-structured"  # 10 rows: a shape the kernels cannot tile
    x = torch.randn(64, 128, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fast(x.half()).float(), model(x), rtol=2e-2, atol=2e-2)
