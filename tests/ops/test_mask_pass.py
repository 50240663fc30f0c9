"""The pass that zeroes pruned entries of a gradient: exact ``where`` semantics on every dtype,
the threaded CPU path for large tensors, strided tensors."""

import math

import pytest
import torch

from sparsekern.ops._mask_pass import CACHED_BITS_MAX, zero_pruned, zero_pruned_


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_where_semantics_nan_inf_negative_zero(dtype, device):
    t = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1.5, -2.0], device=device).to(dtype)
    mask = torch.tensor([False, False, False, True, True, False], device=device)
    ref = torch.where(mask, t, torch.zeros((), dtype=dtype, device=device))
    out = zero_pruned_(t.clone(), mask)
    assert torch.equal(out, ref)
    assert torch.signbit(out[3]), "-0.0 at a kept entry must stay -0.0 (bits untouched)"
    assert not torch.signbit(out[0]), "a pruned entry becomes +0.0"
    assert torch.equal(zero_pruned(t, mask), ref)


@pytest.mark.parametrize("numel", [1, 1000, CACHED_BITS_MAX, CACHED_BITS_MAX + 7])
def test_small_and_large_tensors(numel, device):
    """Up to CACHED_BITS_MAX elements the CPU pass ANDs with a cached integer mask; past it, numpy
    on the bool mask split across torch's threads (ragged chunks)."""
    t = torch.randn(numel, device=device)
    mask = torch.rand(numel, device=device) < 0.3
    ref = torch.where(mask, t, 0.0)
    assert torch.equal(zero_pruned_(t, mask), ref)


def test_returns_the_same_tensor_in_place(device):
    t = torch.randn(7, 9, device=device)
    mask = torch.rand(7, 9, device=device) < 0.5
    assert zero_pruned_(t, mask) is t


def test_strided_tensor_and_mask(device):
    base = torch.randn(12, 10, device=device)
    t = base.t()  # non-contiguous
    mask = (torch.rand(12, 10, device=device) < 0.5).t()  # non-contiguous too
    expected = torch.where(mask, t, 0.0)
    zero_pruned_(t, mask)
    assert torch.equal(t, expected)


def test_out_of_place_is_differentiable():
    t = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 4) < 0.5
    (g,) = torch.autograd.grad(zero_pruned(t, mask).square().sum(), t, create_graph=True)
    assert torch.equal(g.detach(), torch.where(mask, 2 * t.detach(), 0.0))
    assert g.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cached_integer_mask_follows_in_place_mask_changes(dtype, device):
    mask = torch.rand(30, 20, device=device) < 0.5
    for _ in range(3):
        t = torch.randn(30, 20, device=device).to(dtype)
        assert torch.equal(zero_pruned_(t.clone(), mask), torch.where(mask, t, 0).to(dtype))
        mask[::2] = ~mask[::2]  # in place: the cached copy must be recomputed
