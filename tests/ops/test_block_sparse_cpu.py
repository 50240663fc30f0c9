"""The block-sparse CPU path (no interpreter): torch.sparse BSR products over the stored blocks
for both storages, against a float64 reference, every gradient by name, ragged shapes and the
layouts that break block-sparse code; the density past which block mode runs the dense GEMM."""

import importlib
import math

import pytest
import torch

from sparsekern.formats.block_sparse import BlockSparseMatrix, block_grid
from sparsekern.nn import SparseLinear, check_masks
from sparsekern.ops import block_masked_linear, block_sparse_linear

bsl = importlib.import_module("sparsekern.ops.block_sparse_linear")
# the modules where the CPU path's functions and bounds are looked up (what a patch must replace)
bsl_cpu = importlib.import_module("sparsekern.ops.block_sparse_linear.cpu")  # _cpu_dw's callees
bsl_ops = importlib.import_module("sparsekern.ops.block_sparse_linear.custom_ops")  # _cpu_fwd/dx
bsl_op = importlib.import_module("sparsekern.ops.block_sparse_linear.op")  # the density bounds

N_OUT, K_IN = 70, 50  # ragged for every block size


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _block_mask(layout, shape, block, density=0.2):
    R, C = block_grid(shape, block)
    occ = torch.rand(R, C) < density
    if layout == "empty_rows_cols":
        occ[0], occ[:, -1] = False, False
        occ[1, 0] = True
    elif layout == "single":
        occ[:] = False
        occ[-1, -1] = True
    elif layout == "full":
        occ[:] = True
    elif layout == "none":
        occ[:] = False
    return occ.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]]


def _reference(x, w, mask, b, dy):
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if b is not None else None
    yr = torch.nn.functional.linear(xr, wr * mask, br)
    yr.backward(dy.double())
    return yr.detach(), xr.grad, wr.grad, None if br is None else br.grad


def _close(got, ref, n, name):
    torch.testing.assert_close(
        got.double(), ref, rtol=1e-5, atol=1e-5 * math.sqrt(max(n, 1)), msg=lambda m: f"{name}: {m}"
    )


@pytest.mark.parametrize("block", [(16, 32), (32, 16), (16, 16)], ids=str)
@pytest.mark.parametrize("layout", ["random", "empty_rows_cols", "single", "full", "none"])
def test_compact_forward_and_gradients(layout, block, monkeypatch):
    calls = []
    for mod, name in ((bsl_ops, "_cpu_fwd"), (bsl_ops, "_cpu_dx"), (bsl_cpu, "_cpu_dvalues")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    mask = _block_mask(layout, (N_OUT, K_IN), block)
    w = torch.randn(N_OUT, K_IN)
    W = BlockSparseMatrix.from_dense(w, block, mask=mask)
    W.values.requires_grad_()
    x = torch.randn(2, 5, K_IN, requires_grad=True)
    b = torch.randn(N_OUT, requires_grad=True)
    y = block_sparse_linear(x, W, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert calls == ["_cpu_fwd", "_cpu_dx", "_cpu_dvalues"]
    kept = W.to_mask()
    yr, dxr, dwr, dbr = _reference(x, w, kept, b, dy)
    _close(y, yr, K_IN, "y")
    _close(x.grad, dxr, N_OUT, "dx")
    dense_g = BlockSparseMatrix(W.values.grad, W.row_ptr, W.col_idx, W.shape, block).to_dense()
    _close(dense_g, dwr, 10, "dvalues")
    _close(b.grad, dbr, 10, "dbias")


@pytest.mark.parametrize("fresh", [False, True], ids=["allocator", "fresh_pages"])
@pytest.mark.parametrize("holes", [False, True], ids=["whole_blocks", "holes"])
@pytest.mark.parametrize("assume", [False, True], ids=["exact", "assume_pruned_zero"])
def test_dense_storage(holes, assume, fresh, monkeypatch, request):
    # the training step's BSR path is under test, not its density bound
    monkeypatch.setattr(bsl_op, "CPU_BSR_MAX_DENSITY_TRAIN", bsl.CPU_BSR_MAX_DENSITY)
    if fresh:  # the dense gradient on a pooled mapping (ops/_fresh.py), as large weights get it
        request.getfixturevalue("pooled_gradients")
    calls = []
    real = bsl_ops._cpu_fwd
    monkeypatch.setattr(bsl_ops, "_cpu_fwd", lambda *a: calls.append(1) or real(*a))
    block = (16, 16)
    mask = _block_mask("empty_rows_cols", (N_OUT, K_IN), block)
    if holes:
        mask &= torch.rand(N_OUT, K_IN) < 0.7
    w = torch.randn(N_OUT, K_IN)
    if assume:
        w = torch.where(mask, w, 0)
    else:
        w[~mask] = math.nan  # pruned entries do not exist, whatever they hold
    w.requires_grad_()
    x = torch.randn(23, K_IN, requires_grad=True)
    b = torch.randn(N_OUT, requires_grad=True)
    y = block_masked_linear(x, w, mask, b, block, assume_pruned_zero=assume)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert calls == [1], "the BSR path must run at this density"
    yr, dxr, dwr, dbr = _reference(x, torch.where(mask, w, 0), mask, b, dy)
    _close(y, yr, K_IN, "y")
    _close(x.grad, dxr, N_OUT, "dx")
    _close(w.grad, dwr, 23, "dweight")
    _close(b.grad, dbr, 23, "dbias")
    assert (w.grad[~mask] == 0).all()


def test_dense_blocks_run_the_dense_gemm(monkeypatch):
    """Past CPU_BSR_MAX_DENSITY of the blocks the BSR product would cost: block mode runs the
    dense GEMM (masked_linear) with the same results."""
    monkeypatch.setattr(bsl_ops, "_cpu_fwd", lambda *a: (_ for _ in ()).throw(AssertionError))
    mask = _block_mask("random", (N_OUT, K_IN), (16, 16), density=0.9)
    assert bsl.layout_of_mask(mask, 16).nnz > bsl.CPU_BSR_MAX_DENSITY * 20
    w = torch.where(mask, torch.randn(N_OUT, K_IN), 0).requires_grad_()
    x = torch.randn(4, K_IN)
    y = block_masked_linear(x, w, mask, None, 16)
    _close(y, _reference(x, w, mask, None, torch.zeros_like(y))[0], K_IN, "y")


@pytest.mark.parametrize("train", [False, True])
def test_training_bound_is_lower(monkeypatch, train):
    """Between CPU_BSR_MAX_DENSITY_TRAIN and CPU_BSR_MAX_DENSITY of the blocks: inference runs
    the BSR product, a step that computes dW runs the dense GEMM (dW's dense gradient costs)."""
    calls = []
    real = bsl_ops._cpu_fwd
    monkeypatch.setattr(bsl_ops, "_cpu_fwd", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    occ = torch.zeros(20, dtype=torch.bool)  # the 5 x 4 grid of 16 x 16 blocks
    occ[torch.randperm(20, generator=g)[:4]] = True  # 20% of the blocks
    mask = occ.view(5, 4).repeat_interleave(16, 0).repeat_interleave(16, 1)
    mask = mask[:N_OUT, :K_IN].contiguous()
    nnz = bsl.layout_of_mask(mask, 16).nnz
    assert bsl.CPU_BSR_MAX_DENSITY_TRAIN * 20 < nnz <= bsl.CPU_BSR_MAX_DENSITY * 20
    w = torch.where(mask, torch.randn(N_OUT, K_IN), 0).requires_grad_(train)
    x = torch.randn(4, K_IN)
    y = block_masked_linear(x, w, mask, None, 16)
    assert calls == ([] if train else [1])
    _close(y, _reference(x, w, mask, None, torch.zeros_like(y))[0], K_IN, "y")


def test_dvalues_chunks_over_the_batch(monkeypatch):
    monkeypatch.setattr(bsl_cpu, "_CPU_DW_BYTES", 2000)  # a few rows per chunk
    block = (16, 16)
    mask = _block_mask("random", (N_OUT, K_IN), block, density=0.5)
    W = BlockSparseMatrix.from_dense(torch.randn(N_OUT, K_IN), block, mask=mask)
    x = torch.randn(37, K_IN, dtype=torch.float64)
    dy = torch.randn(37, N_OUT, dtype=torch.float64)
    lay = bsl.layout_of_matrix(W)
    got = BlockSparseMatrix(bsl_cpu._cpu_dvalues(dy, x, lay), W.row_ptr, W.col_idx, W.shape, block)
    torch.testing.assert_close(got.to_dense(), (dy.t() @ x) * W.to_mask())


def test_block_mode_module_trains_on_the_cpu_path():
    layer = SparseLinear(K_IN, N_OUT, block_size=16)
    layer.set_mask(_block_mask("random", (N_OUT, K_IN), (16, 16)))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(8, K_IN)).square().mean().backward()
        opt.step()
    assert check_masks(layer) == []


def test_dense_storage_pooled_gradient_masked_in_place(monkeypatch, pooled_gradients):
    """A weight the blocks tile exactly: its gradient on a pooled mapping is masked in place
    (holes inside the kept blocks exactly zero, the rest the reference's)."""
    monkeypatch.setattr(bsl_op, "CPU_BSR_MAX_DENSITY_TRAIN", bsl.CPU_BSR_MAX_DENSITY)
    calls = []
    real = bsl_cpu.zero_pruned_
    monkeypatch.setattr(bsl_cpu, "zero_pruned_", lambda *a: calls.append(1) or real(*a))
    mask = _block_mask("empty_rows_cols", (64, 48), (16, 16)) & (torch.rand(64, 48) < 0.7)
    w = torch.where(mask, torch.randn(64, 48), 0).requires_grad_()
    x = torch.randn(9, 48, requires_grad=True)
    y = block_masked_linear(x, w, mask, None, (16, 16), assume_pruned_zero=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    _, dxr, dwr, _ = _reference(x, w, mask, None, dy)
    assert calls == [1]
    _close(w.grad, dwr, 9, "dweight")
    _close(x.grad, dxr, 64, "dx")
    assert (w.grad[~mask] == 0).all()
