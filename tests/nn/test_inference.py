"""Block-sparse training and export: SparseLinear's block mode trains through the block kernels with
the mask invariant kept; to_inference gives BlockSparseLinear layers whose outputs equal the
masked model's and whose state dict holds only stored blocks (its size falls with density)."""

import copy
import importlib
import io
import pickle

import pytest
import torch
from torch import nn

from sparsekern.formats.block_sparse import block_occupancy
from sparsekern.nn import SparseLinear, sparsify
from sparsekern.nn.inference import BlockSparseConv2d, BlockSparseLinear, to_inference
from sparsekern.pruning.block import prune_blocks_

bsl = importlib.import_module("sparsekern.ops.block_sparse_linear")


def _mlp(device, block_size=(16, 16)):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(50, 70), nn.ReLU(), nn.Linear(70, 10)).to(device)
    return sparsify(model, block_size=block_size)


def test_block_mode_runs_the_block_kernels(device, monkeypatch):
    calls = []
    orig = bsl.bsr_fwd_launch
    monkeypatch.setattr(bsl, "bsr_fwd_launch", lambda *a, **k: calls.append(1) or orig(*a, **k))
    model = _mlp(device)
    assert model[0].block_size == (16, 16) and "block_size=(16, 16)" in repr(model[0])
    model(torch.randn(3, 50, device=device))
    assert len(calls) == 2


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_block_mode_training_keeps_pruned_blocks_zero(opt_name, device):
    model = _mlp(device)
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        if opt_name == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    )
    x, y = torch.randn(32, 50, device=device), torch.randint(0, 10, (32,), device=device)
    for step in range(8):
        if step == 3:  # prune mid-training: optimizer state of pruned weights is zeroed too
            kept = prune_blocks_(model, density={"0": 0.3, "2": 0.5}, norm="l2", optimizer=opt)
            assert 0 < kept["0"] < 0.5  # a weight fraction: edge blocks are partial
            assert int(block_occupancy(model[0].mask, (16, 16)).sum()) == round(0.3 * 5 * 4)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for layer in (model[0], model[2]):
        assert (layer.weight[~layer.mask] == 0).all(), "a pruned weight moved"
        assert layer.weight[layer.mask].abs().sum() > 0
    # the layout the kernels use has only the kept blocks
    lay = bsl.layout_of_mask(model[0].mask, (16, 16))
    assert lay.keep is None, "block pruning must leave whole blocks"
    assert lay.nnz == int(block_occupancy(model[0].mask, (16, 16)).sum()) < 5 * 4


def test_block_mode_matches_unstructured_mode(device):
    model = _mlp(device)
    prune_blocks_(model, density=0.4)
    ref = copy.deepcopy(model)
    for layer in (ref[0], ref[2]):
        layer.set_block_size(None)
    x = torch.randn(9, 50, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, yr = model(x), ref(x2)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad, rtol=1e-5, atol=1e-4)


def test_to_inference_equal_outputs_and_only_blocks_in_state_dict(device):
    model = _mlp(device)
    prune_blocks_(model, density=0.25)
    inf = to_inference(model)
    assert isinstance(inf[0], BlockSparseLinear) and isinstance(model[0], SparseLinear)
    x = torch.randn(6, 50, device=device)
    torch.testing.assert_close(inf(x), model(x), rtol=1e-5, atol=1e-5)
    sd = inf.state_dict()
    assert "0.weight" not in sd and "0.mask" not in sd
    kept_blocks = int(model[0].mask.float().sum()) // 256 + 4  # + ragged edge blocks at most
    assert sd["0.values"].shape[0] <= kept_blocks
    assert sd["0.values"].shape[1:] == (16, 16)


def test_to_inference_state_dict_size_falls_with_density():
    """Serialised bytes of a 512x512 layer at 32x32 blocks, density 1 -> 0.05."""
    sizes = {}
    for d in (1.0, 0.5, 0.25, 0.05):
        torch.manual_seed(0)
        model = sparsify(nn.Sequential(nn.Linear(512, 512)), block_size=32)
        prune_blocks_(model, density=d)
        buf = io.BytesIO()
        torch.save(to_inference(model).state_dict(), buf)
        sizes[d] = len(buf.getvalue())
    dense = 512 * 512 * 4
    assert sizes[1.0] > dense
    assert sizes[0.05] < 0.07 * dense + 8192, sizes
    assert sizes[1.0] > sizes[0.5] > sizes[0.25] > sizes[0.05]


def test_state_dict_load_deepcopy_pickle(device):
    model = _mlp(device)
    prune_blocks_(model, density=0.3)
    inf = to_inference(model)
    other = to_inference(_mlp(device))  # different layout, different nnz
    other.load_state_dict(inf.state_dict())
    x = torch.randn(4, 50, device=device)
    torch.testing.assert_close(other(x), inf(x), rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(inf)(x), inf(x), rtol=0, atol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(inf))(x), inf(x), rtol=0, atol=0)


def test_load_rejects_a_corrupt_layout_and_leaves_the_layer(device):
    inf = to_inference(_mlp(device))
    before = inf[0].values.detach().clone()
    sd = inf.state_dict()
    sd["0.col_idx"] = sd["0.col_idx"].flip(0)  # unsorted block columns
    with pytest.raises(RuntimeError, match="strictly increasing"):
        inf.load_state_dict(sd)
    assert torch.equal(inf[0].values, before)


def test_block_sparse_linear_trains_values(device):
    """Fine-tuning at a fixed layout: gradients reach values, stored blocks only."""
    model = _mlp(device)
    prune_blocks_(model, density=0.5)
    inf = to_inference(model)
    opt = torch.optim.SGD(inf.parameters(), lr=0.1)
    x = torch.randn(16, 50, device=device)
    before = inf[0].values.detach().clone()
    inf(x).square().mean().backward()
    opt.step()
    assert inf[0].values.grad.shape == inf[0].values.shape
    assert not torch.equal(inf[0].values, before)


def test_to_inference_errors_and_options(device):
    with pytest.raises(ValueError, match=r"in \(16, 32, 64, 128\), got \(20, 20\)"):
        to_inference(_mlp(device), block_size=20)
    plain = nn.Sequential(nn.Linear(40, 40)).to(device)
    assert isinstance(to_inference(plain)[0], nn.Linear)
    assert isinstance(to_inference(plain, dense_too=True)[0], BlockSparseLinear)
    model = _mlp(device)
    assert to_inference(model, inplace=True) is model and isinstance(model[0], BlockSparseLinear)
    layer = SparseLinear(40, 30).to(device)
    single = to_inference(layer, block_size=(32, 16))
    assert isinstance(single, BlockSparseLinear) and single.block_size == (32, 16)


def _cnn(device):
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 20, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(20, 18, 3, stride=2, padding="valid"),
        nn.Conv2d(18, 18, 3, padding=1, groups=2),  # grouped: kept as it is
        nn.Flatten(),
        nn.Linear(18 * 3 * 3, 10),
    ).to(device)
    return sparsify(model)


def test_to_inference_converts_convs_with_equal_outputs(device):
    model = _cnn(device)
    prune_blocks_(model, density={"0": 0.5, "2": 0.4, "5": 0.5}, block_size=16)
    inf = to_inference(model, block_size=16)
    assert isinstance(inf[0], BlockSparseConv2d) and isinstance(inf[2], BlockSparseConv2d)
    assert not isinstance(inf[3], BlockSparseConv2d), "a grouped conv was converted"
    assert isinstance(inf[5], BlockSparseLinear)
    x = torch.randn(2, 3, 8, 8, device=device)
    torch.testing.assert_close(inf(x), model(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inf[0].to_dense(), model[0].weight * model[0].mask)
    # unbatched input, and a round trip through the state dict into a fresh export
    torch.testing.assert_close(inf[0](x[0]), model[0](x[0]), rtol=1e-4, atol=1e-4)
    other = to_inference(_cnn(device), block_size=16)
    other.load_state_dict(inf.state_dict())
    torch.testing.assert_close(other(x), inf(x), rtol=0, atol=0)
    assert inf[2].values.shape[0] < 2 * 9 * 2  # fewer blocks stored than the full grid
    with pytest.raises(RuntimeError, match="expected stride"):
        bad = inf.state_dict()
        bad["0._extra_state"] = {**bad["0._extra_state"], "stride": [2, 2]}
        other.load_state_dict(bad)
