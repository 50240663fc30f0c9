"""SparseLinear: forward/backward against nn.Linear and F.linear(x, W * M), state dict, copies."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.formats.block_sparse import BlockSparseFormatError
from sparsekern.nn import SparseLinear, sparsify


def random_mask(shape, density=0.5, device="cpu"):
    return torch.rand(shape, device=device) < density


def pruned_layer(device, in_f=12, out_f=7, bias=True):
    layer = SparseLinear(in_f, out_f, bias=bias, device=device)
    layer.set_mask(random_mask(layer.weight.shape, device=device))
    return layer


def test_constructor(device):
    layer = SparseLinear(5, 3, device=device, dtype=torch.float64)
    assert isinstance(layer, nn.Linear)
    assert layer.weight.shape == (3, 5) and layer.weight.dtype == torch.float64
    assert layer.mask.dtype == torch.bool and layer.mask.shape == (3, 5)
    assert layer.mask.device == layer.weight.device
    assert bool(layer.mask.all()) and layer.density == 1.0
    assert SparseLinear(5, 3, bias=False).bias is None


def test_all_true_matches_nn_linear(device):
    dense = nn.Linear(16, 9, device=device)
    sparse = SparseLinear.from_dense(copy.deepcopy(dense))
    x = torch.randn(4, 16, device=device)
    torch.testing.assert_close(sparse(x), dense(x))


@pytest.mark.parametrize("bias", [True, False])
def test_random_mask_matches_masked_f_linear(device, bias):
    layer = SparseLinear(16, 9, bias=bias, device=device)
    mask = random_mask(layer.weight.shape, device=device)
    layer.set_mask(mask)
    x = torch.randn(2, 3, 16, device=device)  # leading dims are batch dims
    expected = F.linear(x, layer.weight * mask, layer.bias)
    out = layer(x)
    assert out.shape == (2, 3, 9)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_against_float64_reference(device, bias):
    layer = SparseLinear(16, 9, bias=bias, device=device)
    # Random weights also at pruned entries (bypassing set_mask): the op itself must mask them.
    mask = random_mask(layer.weight.shape, device=device)
    with torch.no_grad():
        layer.mask.copy_(mask)
    x = torch.randn(5, 16, device=device, requires_grad=True)
    dy = torch.randn(5, 9, device=device)
    layer(x).backward(dy)

    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_() if bias else None
    x64 = x.detach().double().requires_grad_()
    F.linear(x64, w64 * mask, b64).backward(dy.double())

    assert bool((layer.weight.grad[~mask] == 0).all()), "weight.grad must be exactly 0 when pruned"
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad, w64.grad.float(), **tol)
    torch.testing.assert_close(x.grad, x64.grad.float(), **tol)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b64.grad.float(), **tol)


def test_density_and_repr():
    layer = SparseLinear(4, 2)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    layer.set_mask(mask)
    assert layer.density == pytest.approx(4 / 8)
    assert isinstance(layer.density, float)
    assert "density=0.5000" in repr(layer)
    assert "in_features=4" in repr(layer)


def test_from_dense_shares_parameters(device):
    dense = nn.Linear(6, 4, device=device, dtype=torch.float64).train(False)
    sparse = SparseLinear.from_dense(dense)
    assert sparse.weight is dense.weight and sparse.bias is dense.bias
    assert sparse.weight.dtype == torch.float64 and sparse.mask.device == dense.weight.device
    assert not sparse.training
    assert bool(sparse.mask.all())

    no_bias = SparseLinear.from_dense(nn.Linear(6, 4, bias=False, device=device))
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight", "mask"]


def test_from_dense_with_mask_and_from_sparse(device):
    dense = nn.Linear(6, 4, device=device)
    mask = random_mask((4, 6), device=device)
    sparse = SparseLinear.from_dense(dense, mask=mask)
    assert torch.equal(sparse.mask, mask)
    assert bool((dense.weight[~mask] == 0).all())  # shared weight: zeroed where pruned

    again = SparseLinear.from_dense(sparse)  # a sparse module's mask comes along (as a copy)
    assert torch.equal(again.mask, mask) and again.mask is not sparse.mask


def test_from_dense_rejects_other_types():
    with pytest.raises(TypeError, match="expected an nn.Linear, got Conv2d"):
        SparseLinear.from_dense(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="expected an initialised weight"):
        SparseLinear.from_dense(nn.LazyLinear(3))


def test_state_dict_keys():
    assert list(SparseLinear(3, 2).state_dict()) == ["weight", "bias", "mask"]
    assert list(SparseLinear(3, 2, bias=False).state_dict()) == ["weight", "mask"]


def test_dense_state_dict_loads_strict(device):
    dense = nn.Linear(8, 5, device=device)
    sparse = pruned_layer(device, 8, 5)
    result = sparse.load_state_dict(dense.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert bool(sparse.mask.all())  # a dense checkpoint means a dense layer
    x = torch.randn(3, 8, device=device)
    torch.testing.assert_close(sparse(x), dense(x))


def test_sparse_state_dict_round_trip(device):
    src = pruned_layer(device)
    dst = SparseLinear(12, 7, device=device)
    mask_buffer = dst.mask
    dst.load_state_dict(src.state_dict(), strict=True)
    assert dst.mask is mask_buffer  # loaded in place
    assert torch.equal(dst.mask, src.mask) and torch.equal(dst.weight, src.weight)
    x = torch.randn(3, 12, device=device)
    torch.testing.assert_close(dst(x), src(x))


def test_loading_a_mask_zeroes_pruned_weights(device):
    state = SparseLinear(4, 3, device=device).state_dict()
    state["mask"] = random_mask((3, 4), device=device)
    state["weight"] = torch.randn(3, 4, device=device)  # nonzero where the mask says pruned
    layer = SparseLinear(4, 3, device=device)
    layer.load_state_dict(state)
    assert bool((layer.weight[~state["mask"]] == 0).all())


def test_loading_a_non_bool_mask_fails():
    state = SparseLinear(4, 3).state_dict()
    state["mask"] = state["mask"].float()
    layer = SparseLinear(4, 3)
    with pytest.raises(RuntimeError, match="expected a mask of dtype torch.bool, got torch.float"):
        layer.load_state_dict(state)


def test_deepcopy_and_pickle(device):
    layer = pruned_layer(device)
    x = torch.randn(2, 12, device=device)
    clone = copy.deepcopy(layer)
    assert clone.mask is not layer.mask and torch.equal(clone.mask, layer.mask)
    torch.testing.assert_close(clone(x), layer(x))
    clone.mask.fill_(True)  # independent copies
    assert not bool(layer.mask.all())

    restored = pickle.loads(pickle.dumps(layer))
    assert isinstance(restored, SparseLinear)
    assert torch.equal(restored.mask, layer.mask) and restored.mask.dtype == torch.bool
    torch.testing.assert_close(restored(x), layer(x))

    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded.mask, layer.mask)


def test_casts_keep_mask_bool():
    layer = SparseLinear(4, 3)
    layer.set_mask(random_mask((3, 4)))
    mask = layer.mask.clone()
    for cast in (lambda m: m.double(), lambda m: m.half(), lambda m: m.type(torch.float64)):
        cast(layer)
        assert layer.mask.dtype == torch.bool and torch.equal(layer.mask, mask)


def test_reset_parameters_keeps_pruned_weights_zero():
    layer = SparseLinear(6, 5)
    mask = random_mask((5, 6))
    layer.set_mask(mask)
    layer.reset_parameters()
    assert bool((layer.weight[~mask] == 0).all()) and bool((layer.weight[mask] != 0).all())


def test_block_mode_construction_copy_and_errors():
    layer = SparseLinear(40, 30, block_size=32)
    assert layer.block_size == (32, 32)
    assert copy.deepcopy(layer).block_size == (32, 32)
    assert pickle.loads(pickle.dumps(layer)).block_size == (32, 32)
    dense = nn.Linear(40, 30)
    assert SparseLinear.from_dense(dense, block_size=(16, 64)).block_size == (16, 64)
    assert SparseLinear.from_dense(layer).block_size == (32, 32)  # a SparseLinear's own
    layer.set_block_size(None)
    assert layer.block_size is None
    with pytest.raises(BlockSparseFormatError, match=r"got \(48, 48\)"):
        SparseLinear(40, 30, block_size=48)
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(BlockSparseFormatError, match="got"):
        sparsify(model, block_size=(16, 20))
    assert type(model[0]) is nn.Linear, "a failed sparsify changed the model"


def test_all_true_mask_trains_as_nn_linear_then_masks_after_an_in_place_edit():
    """An all-True mask runs F.linear itself (nothing to mask): output and every gradient are
    nn.Linear's, bit for bit, double backward included. The all-True fact follows the mask's
    version: after an in-place edit the next forward zeroes the newly pruned weights and their
    stale .grad, and dW is again exactly zero there."""
    from sparsekern.nn import execution_plan

    dense = nn.Linear(16, 9)
    sparse = SparseLinear.from_dense(copy.deepcopy(dense))
    x = torch.randn(5, 16)
    for m in (dense, sparse):
        xg = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(m(xg).square().sum(), xg, create_graph=True)
        gx.square().sum().backward()  # a gradient penalty: second order through the layer
    assert execution_plan(sparse)[0].path == "dense" and "all True" in execution_plan(sparse)[0].why
    assert torch.equal(sparse.weight.grad, dense.weight.grad)
    assert torch.equal(sparse.bias.grad, dense.bias.grad)
    assert bool((sparse.weight.grad[:, :4] != 0).all())  # a dense gradient, before the edit

    sparse.mask[:, :4] = False  # in place, with a dense .grad still there
    y = sparse(x)
    pruned = ~sparse.mask
    assert execution_plan(sparse)[0].path == "masked"
    assert bool((sparse.weight[pruned] == 0).all())
    assert bool((sparse.weight.grad[pruned] == 0).all())
    sparse.weight.grad = None
    y.square().sum().backward()
    assert bool((sparse.weight.grad[pruned] == 0).all())
    w = sparse.weight.detach().clone().requires_grad_()
    F.linear(x, w * sparse.mask, sparse.bias.detach()).square().sum().backward()
    torch.testing.assert_close(sparse.weight.grad, w.grad * sparse.mask)


def test_set_mask_between_an_all_true_forward_and_its_backward_keeps_the_invariant():
    """The all-True forward's dW is not masked; after a set_mask before its backward, that dW is
    masked with the new mask, so the step leaves pruned weights at 0 (and so does the next
    forward)."""
    layer = SparseLinear(8, 6)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(4, 8)  # no grad for x: F.linear does not save the weight, so no autograd error
    loss = layer(x).square().sum()
    mask = torch.rand(6, 8) < 0.5
    layer.set_mask(mask, opt)
    loss.backward()
    opt.step()
    assert bool((layer.weight[~mask] == 0).all())
    layer(x)
    assert bool((layer.weight[~mask] == 0).all())
    assert bool((layer.weight.grad[~mask] == 0).all())


def test_masked_path_under_cpu_autocast_matches_the_masked_reference():
    """The module's masked path leaves autocast to F.linear (no explicit casts of its own): the
    output is bf16 as nn.Linear's, the weight gradient fp32 and exactly zero at pruned entries."""
    layer = pruned_layer("cpu", 16, 8)
    x = torch.randn(4, 16)
    w = layer.weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = F.linear(x, w * layer.mask, layer.bias.detach())
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)
    y.float().square().sum().backward()
    ref.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    assert bool((layer.weight.grad[~layer.mask] == 0).all())
    torch.testing.assert_close(layer.weight.grad, w.grad * layer.mask)
