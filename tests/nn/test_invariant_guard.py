"""The mask invariant as a guarded contract: what the sparse modules run (the dense layer's own
ops), how in-place mask edits are seen, and what ``check_masks`` finds after writes no version
counter sees."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import SparseConv2d, SparseLinear, check_masks, set_mask, sparsify
from sparsekern.nn import mask_problems
from sparsekern.ops import dw_backend
from sparsekern.ops._dispatch import use_kernels
from sparsekern.ops._tiles import tile_flags


def _pruned_linear(device, density=0.4, block_size=None):
    layer = SparseLinear(40, 24, block_size=block_size).to(device)
    set_mask(layer, torch.rand(24, 40, device=device) < density)
    return layer


@pytest.mark.parametrize("grad", [False, True])
def test_linear_runs_exactly_the_dense_layer(grad, device):
    """Same weights, same ops: the forward is bitwise nn.Linear's; dW equals nn.Linear's at kept
    weights and is exactly zero at pruned ones."""
    sparse = _pruned_linear(device)
    dense = nn.Linear(40, 24).to(device)
    dense.load_state_dict({"weight": sparse.weight.detach(), "bias": sparse.bias.detach()})
    x = torch.randn(3, 7, 40, device=device)
    with torch.set_grad_enabled(grad):
        ys, yd = sparse(x), dense(x)
    assert torch.equal(ys, yd)
    if not grad:
        assert ys.grad_fn is None
        return
    dy = torch.randn_like(ys)
    ys.backward(dy)
    yd.backward(dy)
    mask = sparse.mask
    assert torch.equal(sparse.weight.grad[mask], dense.weight.grad[mask])
    assert (sparse.weight.grad[~mask] == 0).all()
    assert torch.equal(sparse.bias.grad, dense.bias.grad)


def test_conv_runs_exactly_the_dense_layer(device):
    sparse = SparseConv2d(3, 5, 3, padding=1).to(device)
    set_mask(sparse, torch.rand(sparse.weight.shape, device=device) < 0.4)
    dense = nn.Conv2d(3, 5, 3, padding=1).to(device)
    dense.load_state_dict({"weight": sparse.weight.detach(), "bias": sparse.bias.detach()})
    x = torch.randn(2, 3, 8, 7, device=device)
    ys, yd = sparse(x), dense(x)
    assert torch.equal(ys, yd)
    ys.sum().backward()
    yd.sum().backward()
    mask = sparse.mask
    assert torch.equal(sparse.weight.grad[mask], dense.weight.grad[mask])
    assert (sparse.weight.grad[~mask] == 0).all()
    with torch.no_grad():
        assert torch.equal(sparse(x), dense(x))


@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("edit", ["index", "iand", "replace_buffer", "copy"])
def test_in_place_mask_edits_are_seen_at_the_next_forward(edit, block_size, device):
    layer = _pruned_linear(device, 0.9, block_size)
    x = torch.randn(5, 40, device=device)
    layer(x).sum().backward()
    new = layer.mask.clone()
    new[:16, :16] = False
    if edit == "index":
        layer.mask[:16, :16] = False
    elif edit == "iand":
        layer.mask &= new
    elif edit == "replace_buffer":
        layer.mask = new
    else:
        layer.mask.copy_(new)
    y = layer(x)
    assert check_masks(layer) == []
    assert (layer.weight[~layer.mask] == 0).all() and (layer.weight.grad[~layer.mask] == 0).all()
    ref = F.linear(x, torch.where(new, layer.weight, 0), layer.bias)
    torch.testing.assert_close(y, ref)


def test_conv_guard_too(device):
    conv = SparseConv2d(4, 4, 3).to(device)
    conv.mask[:, :2] = False
    conv(torch.randn(1, 4, 5, 5, device=device))
    assert (conv.weight[:, :2] == 0).all() and check_masks(conv) == []


def test_data_writes_are_found_by_check_masks_and_repaired(device):
    model = nn.Sequential(
        _pruned_linear(device), nn.ReLU(), _pruned_linear(device).requires_grad_()
    )
    model[2] = SparseLinear(24, 8).to(device)
    set_mask(model[2], torch.rand(8, 24, device=device) < 0.5)
    assert check_masks(model) == []
    model[0].weight.data.normal_()  # bypasses every version counter
    model[2].mask.data[0] = False  # a pruned weight left behind, unseen by the guard
    assert check_masks(model) == ["0", "2"]
    problems = mask_problems(model, fix=True)
    assert "pruned weights are not zero" in problems["0"][0]
    assert check_masks(model) == []


def test_nn_init_on_the_weight_is_found(device):
    layer = _pruned_linear(device)
    nn.init.kaiming_uniform_(layer.weight)  # a version bump on the weight, not on the mask
    assert check_masks(layer) == [""]  # the layer itself, as named_modules names it
    layer.reset_parameters()  # the module's own re-init keeps the invariant
    assert check_masks(layer) == []


def test_stale_tile_flags_after_a_data_write_are_reported(device):
    if not use_kernels(torch.empty(0, device=device)):
        pytest.skip("the fused dW kernel (and its tile flags) run only where kernels run")
    layer = SparseLinear(64, 64).to(device)
    mask = torch.zeros(64, 64, dtype=torch.bool, device=device)
    mask[:32] = True
    set_mask(layer, mask)
    with dw_backend("kernel"):
        layer(torch.randn(4, 64, device=device)).sum().backward()
    tile_flags(layer.mask)
    layer.mask.data[40] = True  # regrown through .data: the cached flags say its tile is empty
    problems = mask_problems(layer)
    assert any("stale cached values" in p for p in problems[""])
    mask_problems(layer, fix=True)
    assert check_masks(layer) == []


def test_sparsified_model_trains_with_the_invariant(device):
    model = sparsify(nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(64, 3))).to(device)
    for m in (model[0], model[2]):
        set_mask(m, torch.rand(m.weight.shape, device=device) < 0.3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(3, 2, 6, 6, device=device)).square().mean().backward()
        opt.step()
    assert check_masks(model) == []


def test_torch_func_grad_vmap_and_per_sample_gradients(device):
    """torch.func transforms through the sparse modules: grad, and per-sample gradients by vmap,
    each exactly zero at pruned weights and equal to the dense layer's at kept ones."""
    from torch.func import functional_call, grad, vmap

    lin = _pruned_linear(device)
    conv = SparseConv2d(2, 3, 3).to(device)
    set_mask(conv, torch.rand(conv.weight.shape, device=device) < 0.5)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 4 * 4, 40), nn.ReLU(), lin)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(4, 2, 6, 6, device=device), torch.randn(4, 24, device=device)

    def loss(p, xb, yb):
        return ((functional_call(model, p, (xb,)) - yb) ** 2).sum()

    g = grad(loss)(params, x, y)
    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.unsqueeze(1), y.unsqueeze(1))
    for name, m in (("0", conv), ("4", lin)):
        assert (g[f"{name}.weight"][~m.mask] == 0).all()
        assert (per[f"{name}.weight"][:, ~m.mask] == 0).all()
        torch.testing.assert_close(per[f"{name}.weight"].sum(0), g[f"{name}.weight"])
    ref = dict(model.named_parameters())
    model.zero_grad()
    loss(ref, x, y).backward()
    torch.testing.assert_close(g["4.weight"], lin.weight.grad)


@pytest.mark.parametrize("cls, shape", [("linear", (4, 8)), ("conv", (4, 3, 3, 3))])
def test_a_new_mask_buffer_of_another_shape_is_a_clear_error_before_any_change(cls, shape):
    """The masked path no longer checks the mask per call: the guard checks a new (or edited)
    buffer against the weight once, before zeroing anything, naming expected vs got."""
    layer = SparseLinear(8, 4) if cls == "linear" else SparseConv2d(3, 4, 3)
    layer.set_mask(torch.rand(shape) < 0.5)
    x = torch.randn(2, 8) if cls == "linear" else torch.randn(2, 3, 5, 5)
    before = layer.weight.detach().clone()
    layer.mask = torch.zeros(shape[0], 1, *shape[2:], dtype=torch.bool)  # would broadcast
    with pytest.raises(ValueError, match=r"the mask buffer: expected mask of the weight's shape"):
        layer(x)
    assert torch.equal(layer.weight.detach(), before)
