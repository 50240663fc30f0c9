"""sparse_linear (forward, dX, dW on the kept weights only) against a float64 reference, on the
C++ extension and on the torch.sparse fallback."""

from __future__ import annotations

import pytest
import torch

from sparsekern.ops._ext import NO_EXT_ENV
from sparsekern.ops.sparse_train import _kernels, mask_index
from sparsekern.ops.sparse_train.linear import (
    gather_values,
    sparse_linear,
    sparse_linear_reference,
    sparse_linear_values,
)

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv(NO_EXT_ENV, "1")
    else:
        monkeypatch.delenv(NO_EXT_ENV, raising=False)
    if request.param == "cpp" and _kernels.backend(torch.zeros(1)) != "cpp":
        pytest.skip("the C++ extension cannot be built here (the fallback is tested)")
    return request.param


def _close(got, want, dtype, scale):
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    assert err <= TOL[dtype] * max(1.0, scale), (err, TOL[dtype] * max(1.0, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "lead,k,n,density",
    [((5,), 13, 7, 0.3), ((2, 3), 70, 33, 0.1), ((1,), 1, 1, 1.0), ((4,), 9, 6, 0.0),
     ((17,), 40, 21, 1.0), ((3, 1, 2), 31, 18, 0.6)],
)  # fmt: skip
def test_matches_float64_reference(backend, dtype, lead, k, n, density):
    g = torch.Generator().manual_seed(k * 131 + n)
    mask = torch.rand(n, k, generator=g) < density
    weight = (torch.randn(n, k, generator=g) * mask).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    gy = torch.randn(*lead, n, generator=g).to(dtype)
    ws, xs, bs = (t.clone().requires_grad_() for t in (weight, x, bias))
    y = sparse_linear(xs, ws, mask, bs)
    y.backward(gy)
    wr, xr, br = (t.double().requires_grad_() for t in (weight, x, bias))
    yr = sparse_linear_reference(xr, wr, mask, br)
    yr.backward(gy.double())
    assert y.dtype == dtype and y.shape == (*lead, n)
    scale = max(1.0, float(k) ** 0.5)
    _close(y, yr, dtype, scale)
    _close(xs.grad, xr.grad, dtype, scale)
    _close(ws.grad, wr.grad * mask, dtype, float(x.numel() / k) ** 0.5)
    _close(bs.grad, br.grad, dtype, float(x.numel() / k) ** 0.5)
    assert ws.grad.shape == (n, k) and bool((ws.grad[~mask] == 0).all())
    assert xs.grad.dtype == ws.grad.dtype == bs.grad.dtype == dtype


def test_compact_values_gradient_and_float64(backend):
    n, k = 11, 29
    mask = torch.rand(n, k) < 0.25
    index = mask_index(mask)
    dense = torch.randn(n, k, dtype=torch.float64) * mask
    values = gather_values(dense, index).detach().requires_grad_()
    x = torch.randn(6, k, dtype=torch.float64, requires_grad=True)
    y = sparse_linear_values(x, values, index)  # float64 runs on torch.sparse, exact
    y.backward(torch.ones_like(y))
    wr = dense.clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    sparse_linear_reference(xr, wr, mask).backward(torch.ones(6, n, dtype=torch.float64))
    assert values.grad.shape == (index.nnz,)
    torch.testing.assert_close(values.grad, wr.grad.reshape(-1)[index.flat_idx])
    torch.testing.assert_close(x.grad, xr.grad)


def test_double_backward_matches_reference(backend):
    n, k = 8, 12
    mask = torch.rand(n, k) < 0.5
    w = (torch.randn(n, k, dtype=torch.float64) * mask).requires_grad_()
    x = torch.randn(5, k, dtype=torch.float64, requires_grad=True)
    outs = []
    for fn in (sparse_linear, sparse_linear_reference):
        y = fn(x, w, mask).tanh().sum()
        (gx,) = torch.autograd.grad(y, x, create_graph=True)
        outs.append(torch.autograd.grad(gx.pow(2).sum(), (x, w)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_pruned_entries_never_read(backend):
    mask = torch.tensor([[True, False], [False, True]])
    w = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]], requires_grad=True)
    x = torch.ones(3, 2, requires_grad=True)
    y = sparse_linear(x, w, mask)
    y.sum().backward()
    assert torch.equal(y, torch.tensor([[1.0, 2.0]] * 3))
    assert torch.isfinite(x.grad).all() and torch.equal(w.grad, mask.float() * 3)


@pytest.mark.parametrize("pooled", [True, False])
def test_dense_weight_gradient_on_pooled_mapping(backend, request, pooled):
    """From ``FRESH_MIN`` elements (lowered here) the extension scatters ``weight.grad`` into a
    zeroed pooled mapping: exactly zero at every pruned entry, the kept entries the reference's,
    and a tensor like any other (in-place updates, accumulation, freed and reused)."""
    if pooled and backend == "cpp":
        request.getfixturevalue("pooled_gradients")
    g = torch.Generator().manual_seed(3)
    # each shape twice: the second gradient reuses the first one's mapping, dirtied below
    for n, k, density in [(2048, 2049, 0.05)] * 2 + [(7, 5, 0.4)] * 2 + [(3, 4, 0.0)]:
        mask = torch.rand(n, k, generator=g) < density
        w = torch.randn(n, k, generator=g).requires_grad_()
        x = torch.randn(6, k, generator=g)
        gy = torch.randn(6, n, generator=g)
        sparse_linear(x, w, mask).backward(gy)
        want = torch.where(mask, gy.double().t() @ x.double(), 0)
        assert w.grad.shape == (n, k) and w.grad.is_contiguous()
        assert torch.equal(w.grad[~mask], torch.zeros_like(w.grad[~mask]))
        _close(w.grad, want, torch.float32, x.shape[0])
        sparse_linear(x, w, mask).backward(gy)  # accumulates into the mapped gradient
        _close(w.grad, 2 * want, torch.float32, 2 * x.shape[0])
        w.grad.mul_(0.5).add_(1.0)  # writable everywhere, pruned pages included
        assert torch.equal(w.grad[~mask], torch.ones_like(w.grad[~mask]))
        w.grad = None  # back to the pool; the next iteration reuses (and zeroes) it


def test_index_follows_mask_edit(backend):
    mask = torch.ones(4, 5, dtype=torch.bool)
    w = torch.randn(4, 5)
    x = torch.randn(3, 5)
    sparse_linear(x, w, mask)
    mask[1, 2] = False  # in place: the cached index must not be reused
    torch.testing.assert_close(sparse_linear(x, w, mask), sparse_linear_reference(x, w, mask))


def test_bad_input_names_expected_and_got():
    w, m = torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"expected x of shape \[\.\.\., 4\].*got \[2, 5\]"):
        sparse_linear(torch.randn(2, 5), w, m)
    with pytest.raises(ValueError, match=r"expected a mask of the weight's shape \[3, 4\], got"):
        sparse_linear(torch.randn(2, 4), w, m[:, :3])
    with pytest.raises(TypeError, match="expected dtype torch.bool, got torch.float32"):
        sparse_linear(torch.randn(2, 4), w, m.float())
    with pytest.raises(TypeError, match="expected x of the weight's dtype torch.float32"):
        sparse_linear(torch.randn(2, 4, dtype=torch.float64), w, m)
    with pytest.raises(ValueError, match=r"expected values of shape \[12\].*got \[5\]"):
        sparse_linear_values(torch.randn(2, 4), torch.randn(5), mask_index(m))
