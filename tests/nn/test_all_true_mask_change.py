"""A mask change between an all-True (dense, unmasked) forward and its backward: the backward's dW
is masked with the new mask before it reaches ``.grad`` or the optimizer (SparseLinear,
SparseConv2d), also after copies of the model."""

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import SparseConv2d, SparseLinear, execution_plan, set_mask, sparsify

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
}


def _loss(module, x):
    return module(x).square().sum()


def _state_tensors(opt, param):
    return {k: v for k, v in opt.state[param].items() if torch.is_tensor(v) and v.dim() > 0}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_set_mask_after_an_all_true_forward_masks_its_dw_before_the_step(opt_name):
    """Forward on an all-True mask, set_mask(..., optimizer), backward, step: the pruned weights,
    their .grad and their optimizer state are exactly 0 right after the step (and in a state dict
    saved then), and every kept entry equals a reference whose dW was masked from the start of
    the backward (nn.Linear, mask applied by hand)."""
    torch.manual_seed(0)
    ref = nn.Linear(8, 6)
    sparse = SparseLinear.from_dense(copy.deepcopy(ref))
    opt, ref_opt = OPTIMIZERS[opt_name](sparse.parameters()), OPTIMIZERS[opt_name](ref.parameters())
    x = torch.randn(4, 8)  # no grad for x: F.linear does not save the weight, nothing raises
    for module, o in ((sparse, opt), (ref, ref_opt)):  # a first step: state at every entry
        _loss(module, x).backward()
        o.step()
        o.zero_grad()
    mask = torch.rand(sparse.weight.shape) < 0.5

    loss = _loss(sparse, x)
    assert execution_plan(sparse)[0].path == "dense"  # the all-True path, no masked dW
    set_mask(sparse, mask, optimizer=opt)
    loss.backward()
    opt.step()

    ref_loss = _loss(ref, x)
    with torch.no_grad():
        ref.weight.masked_fill_(~mask, 0)
        for v in _state_tensors(ref_opt, ref.weight).values():
            v.masked_fill_(~mask, 0)
    ref_loss.backward()
    ref.weight.grad = torch.where(mask, ref.weight.grad, 0.0)
    ref_opt.step()

    pruned = ~mask
    assert bool((sparse.weight.grad[pruned] == 0).all())
    assert bool((sparse.weight[pruned] == 0).all())
    assert bool((sparse.state_dict()["weight"][pruned] == 0).all())
    state, ref_state = _state_tensors(opt, sparse.weight), _state_tensors(ref_opt, ref.weight)
    assert state.keys() == ref_state.keys() and state
    for k, v in state.items():
        assert bool((v[pruned] == 0).all()), k
        torch.testing.assert_close(v, ref_state[k], rtol=0, atol=0)
    torch.testing.assert_close(sparse.weight.grad, ref.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(sparse.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(sparse.bias, ref.bias, rtol=0, atol=0)


def test_conv_set_mask_before_the_backward_raises_and_an_in_place_edit_is_masked():
    """F.conv2d saves the weight for its backward, so set_mask (which zeroes weights in place)
    between an all-True forward and its backward raises autograd's in-place error, as nn.Conv2d
    would; an in-place edit of the mask buffer alone (weights zeroed at the next forward) lets the
    backward run, and its dW is masked with the edited mask."""
    torch.manual_seed(0)
    conv = SparseConv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    mask = torch.rand(conv.weight.shape) < 0.5
    loss = _loss(conv, x)
    set_mask(conv, mask)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

    conv.set_mask(torch.ones_like(mask))
    w = conv.weight.detach().clone().requires_grad_()
    loss = _loss(conv, x)
    conv.mask &= mask
    loss.backward()
    F.conv2d(x, w, conv.bias.detach(), padding=1).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, torch.where(mask, w.grad, 0.0))
    conv(x)
    assert bool((conv.weight[~mask] == 0).all())


def test_autograd_grad_and_a_mixed_backward_are_masked_too():
    """torch.autograd.grad (no .grad accumulation) returns the masked dW; a backward summing an
    all-True forward recorded before the change and a masked one after it is masked."""
    torch.manual_seed(0)
    layer = SparseLinear(8, 6)
    x = torch.randn(4, 8)
    mask = torch.rand(6, 8) < 0.5
    loss = _loss(layer, x)
    layer.set_mask(mask)
    (gw,) = torch.autograd.grad(loss, layer.weight)
    assert bool((gw[~mask] == 0).all()) and bool((gw[mask] != 0).any())

    layer.set_mask(torch.ones_like(mask))
    w_early = layer.weight.detach().clone()
    early = _loss(layer, x)  # all True
    layer.set_mask(mask)
    late = _loss(layer, x)  # masked path, under the new mask
    (early + late).backward()
    assert bool((layer.weight.grad[~mask] == 0).all())
    expected = 0
    for w in (w_early, torch.where(mask, w_early, 0.0)):
        w.requires_grad_()
        expected = expected + torch.autograd.grad(_loss_of(x, w, layer.bias.detach()), w)[0]
    torch.testing.assert_close(layer.weight.grad, torch.where(mask, expected, 0.0))


def _loss_of(x, w, b):
    return F.linear(x, w, b).square().sum()


def test_copies_of_a_trained_sparsified_model_keep_masking_their_own_dw():
    """The hook holds its module weakly: deepcopy, pickle and torch.save of a model that ran an
    all-True forward work (no warning), and each copy's hook masks with the copy's own mask."""
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)))
    x = torch.randn(4, 8)
    _loss(model, x).backward()  # all-True forwards: hooks registered
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.save(model, buf)
        copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    copies.append(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    for i, m in enumerate(copies):
        m.zero_grad(set_to_none=True)
        mask = torch.rand(6, 8) < 0.3 + 0.2 * i
        loss = _loss(m, x)
        m[0].set_mask(mask)
        loss.backward()
        assert bool((m[0].weight.grad[~mask] == 0).all()), i
        assert bool((m[0].weight.grad[mask] != 0).any()), i
    assert bool(model[0].mask.all())  # the original is untouched
