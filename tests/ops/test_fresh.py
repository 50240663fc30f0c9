"""Large CPU gradients on pooled mappings (sparsekern/ops/_fresh.py): a reused mapping is zeroed
where zeros are asked for, a kept mapping is released on request, and tensors on them behave
like any other (views, in-place ops, autograd's accumulation)."""

from __future__ import annotations

import pytest
import torch

from sparsekern.ops import _fresh


@pytest.fixture(autouse=True)
def _ext():
    if _fresh.ext() is None:
        pytest.skip("the C++ extension cannot be built here")
    _fresh.release()
    yield
    _fresh.release()


def test_reused_mapping_is_zeroed_and_released():
    shape = (1031, 517)  # ragged: the mapping rounds up to 2 MiB
    a = _fresh.fresh_zeros(shape)
    assert a.shape == shape and a.dtype == torch.float32 and a.is_contiguous()
    assert torch.equal(a, torch.zeros(shape))
    a.fill_(float("nan"))
    ptr = a.data_ptr()
    del a  # back to the pool, not unmapped
    assert _fresh.pooled_bytes() > 0
    b = _fresh.fresh_zeros(shape)
    assert b.data_ptr() == ptr, "a freed mapping of the same size class is reused"
    assert torch.equal(b, torch.zeros(shape)), "a reused mapping must come back zeroed"
    assert _fresh.pooled_bytes() == 0
    b.fill_(7.0)
    del b
    c = _fresh.fresh_empty(shape)  # no zeroing asked for: a GEMM's out= writes all of it
    assert c.data_ptr() == ptr
    torch.mm(torch.ones(1031, 3), torch.ones(3, 517), out=c)
    assert torch.equal(c, torch.full(shape, 3.0))
    del c
    assert _fresh.release() > 0 and _fresh.pooled_bytes() == 0
    d = _fresh.fresh_zeros(shape)  # a new mapping reads as zeros
    assert torch.equal(d, torch.zeros(shape))


def test_tensor_on_a_mapping_is_an_ordinary_tensor():
    w = torch.randn(40, 30, requires_grad=True)
    g = _fresh.fresh_zeros((40, 30))
    g[3, 4] = 2.0
    w.grad = g
    (w * 3).sum().backward()  # accumulates into the mapped gradient
    assert w.grad[3, 4] == 5.0 and w.grad[0, 0] == 3.0
    before = w.detach().clone()
    torch.optim.SGD([w], lr=0.1).step()  # reads the mapped gradient
    torch.testing.assert_close(w.detach(), before - 0.1 * w.grad)
    clone = w.grad.clone()
    w.grad = None
    assert clone[3, 4] == 5.0
