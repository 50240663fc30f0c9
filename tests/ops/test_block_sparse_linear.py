"""block_sparse_linear / block_masked_linear: the Triton kernels (through the interpreter on CPU)
against a float64 reference, for both storages (compact BlockSparseMatrix values, and a dense
weight with a block mask), every gradient by name, odd sizes that are not multiples of the blocks,
and the layouts that break block-sparse kernels: empty block-rows and -columns, a single stored
block, all blocks, no block."""

import importlib
import math

import pytest
import torch

from sparsekern.formats.block_sparse import BlockSparseMatrix, block_grid, block_occupancy
from sparsekern.ops._block_kernels import dw_splits
from sparsekern.ops.block_sparse_linear import (
    block_masked_linear,
    block_sparse_linear,
    block_sparse_linear_reference,
)

bsl = importlib.import_module("sparsekern.ops.block_sparse_linear")
# where the autograd function looks the launchers up (what a spy must replace)
bsl_ops = importlib.import_module("sparsekern.ops.block_sparse_linear.custom_ops")

# (rtol, atol per sqrt(reduction length)), as in test_masked_linear: inputs are rounded to the
# dtype first, so what remains is fp32 accumulation and the output rounding (bf16 stores
# truncate under the interpreter: 2^-7).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = list(TOL)
BLOCKS = [(16, 32), (32, 16), (16, 16)]
LAYOUTS = ["random", "empty_rows_cols", "single", "full", "none"]
# 70 = 4x16+6 = 2x32+6, 50 = 3x16+2 = 32+18: every block grid has a ragged edge
N_OUT, K_IN = 70, 50


def _close(got, ref, dtype, reduce_len, name):
    rtol, atol = TOL[dtype]
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(
        got.double(),
        ref,
        rtol=rtol,
        atol=atol * math.sqrt(max(reduce_len, 1)),
        msg=lambda m: f"{name}: {m}",
    )


def _block_mask(layout: str, shape, block, device) -> torch.Tensor:
    """[N, K] bool made of whole blocks."""
    R, C = block_grid(shape, block)
    occ = torch.rand(R, C, device=device) < 0.45
    if layout == "empty_rows_cols":
        occ[0] = False  # an empty block-row: forward writes only the bias there
        occ[:, -1] = False  # an empty block-column: dX writes zeros there
        occ[1, 0] = True
    elif layout == "single":
        occ[:] = False
        occ[R - 1, C - 1] = True  # the ragged corner block
    elif layout == "full":
        occ[:] = True
    elif layout == "none":
        occ[:] = False
    bm, bk = block
    return occ.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[: shape[0], : shape[1]].clone()


def _reference(x, w, mask, b, dy):
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_()
    yr = torch.nn.functional.linear(xr, wr * mask, br)
    yr.backward(dy.double())
    return yr.detach(), xr.grad, wr.grad * mask, br.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compact_forward_and_gradients(layout, block, dtype, device):
    batch = (37,) if layout != "random" else (2, 3, 5)
    mask = _block_mask(layout, (N_OUT, K_IN), block, device)
    w = torch.randn(N_OUT, K_IN, device=device).to(dtype)
    W = BlockSparseMatrix.from_dense(w, block, mask=mask)
    W.values.requires_grad_()
    x = torch.randn(*batch, K_IN, device=device).to(dtype).requires_grad_()
    b = torch.randn(N_OUT, device=device).to(dtype).requires_grad_()

    y = block_sparse_linear(x, W, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, dbr = _reference(x, w, mask, b, dy)

    _close(y, yr, dtype, K_IN, "y")
    _close(x.grad, dxr, dtype, N_OUT, "dx")
    _close(b.grad, dbr, dtype, x.numel() // K_IN, "dbias")
    # dvalues, by name: densified through the same layout, it is (dy^T x) at stored blocks only.
    g = W.values.grad
    assert g.shape == W.values.shape, f"dvalues: shape {list(g.shape)}"
    dense_g = BlockSparseMatrix(g, W.row_ptr, W.col_idx, W.shape, W.block_size).to_dense()
    _close(dense_g, dwr, dtype, x.numel() // K_IN, "dvalues")
    # The padding of ragged edge blocks (rows >= N or columns >= K) gets exactly zero gradient.
    bm, bk = block
    rows = W.block_row.long()[:, None, None] * bm + torch.arange(bm, device=device)[None, :, None]
    cols = W.col_idx.long()[:, None, None] * bk + torch.arange(bk, device=device)[None, None, :]
    pad = (rows >= N_OUT) | (cols >= K_IN)
    assert (g[pad] == 0).all(), "dvalues: nonzero gradient in the padding of edge blocks"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("layout", ["random", "empty_rows_cols", "none"])
def test_dense_storage_forward_and_gradients(layout, block, dtype, device):
    """SparseLinear's block mode: dense weight, block mask; dW exactly 0 at pruned weights."""
    mask = _block_mask(layout, (N_OUT, K_IN), block, device)
    w = (torch.randn(N_OUT, K_IN, device=device) * mask).to(dtype).requires_grad_()
    x = torch.randn(41, K_IN, device=device).to(dtype).requires_grad_()
    b = torch.randn(N_OUT, device=device).to(dtype).requires_grad_()
    y = block_masked_linear(x, w, mask, b, block)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, dbr = _reference(x, w, mask, b, dy)
    _close(y, yr, dtype, K_IN, "y")
    _close(x.grad, dxr, dtype, N_OUT, "dx")
    _close(w.grad, dwr, dtype, 41, "dweight")
    _close(b.grad, dbr, dtype, 41, "dbias")
    assert (w.grad[~mask] == 0).all(), "dweight: nonzero at pruned weights"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dense_storage_unstructured_mask_inside_blocks(dtype, device):
    """A mask that is not made of whole blocks: kept blocks are masked inside too (MASKED path),
    so y = x (W*M)^T even when pruned weights are not zero, and dW is 0 at every pruned weight."""
    block = (16, 16)
    mask = _block_mask("random", (N_OUT, K_IN), block, device)
    mask &= torch.rand(N_OUT, K_IN, device=device) < 0.7  # holes inside kept blocks
    w = torch.randn(N_OUT, K_IN, device=device).to(dtype).requires_grad_()  # NOT zeroed
    x = torch.randn(23, K_IN, device=device).to(dtype).requires_grad_()
    b = torch.randn(N_OUT, device=device).to(dtype).requires_grad_()
    lay = bsl.layout_of_mask(mask, block)
    assert lay.keep is not None, "layout: a mask with holes inside blocks must be applied in-block"
    y = block_masked_linear(x, w, mask, b, block)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, dbr = _reference(x, w, mask, b, dy)
    _close(y, yr, dtype, K_IN, "y")
    _close(x.grad, dxr, dtype, N_OUT, "dx")
    _close(w.grad, dwr, dtype, 23, "dweight")
    assert (w.grad[~mask] == 0).all(), "dweight: nonzero at pruned weights"


@pytest.mark.parametrize("block", [(64, 64), (128, 128), (64, 128), (128, 16)], ids=str)
def test_large_blocks(block, device):
    """The big block sizes, one odd shape each (fp32: the interpreter is slow at 128-wide dots)."""
    N, K = 150, 200
    mask = _block_mask("random", (N, K), block, device)
    mask[: block[0], : block[1]] = True
    w = torch.randn(N, K, device=device)
    W = BlockSparseMatrix.from_dense(w, block, mask=mask)
    W.values.requires_grad_()
    x = torch.randn(19, K, device=device).requires_grad_()
    b = torch.randn(N, device=device).requires_grad_()
    y = block_sparse_linear(x, W, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, dbr = _reference(x, w, mask, b, dy)
    _close(y, yr, torch.float32, K, "y")
    _close(x.grad, dxr, torch.float32, N, "dx")
    dense_g = BlockSparseMatrix(W.values.grad, W.row_ptr, W.col_idx, W.shape, block).to_dense()
    _close(dense_g, dwr, torch.float32, 19, "dvalues")
    _close(b.grad, dbr, torch.float32, 19, "dbias")


def test_poisoned_outputs_fully_written_and_pruned_blocks_untouched(device):
    """Outputs pre-filled with NaN: y and dx must be written everywhere; dW (dense storage) must be
    written at every kept block and NOWHERE else (pruned blocks are never touched)."""
    block = (16, 32)
    mask = _block_mask("empty_rows_cols", (N_OUT, K_IN), block, device)
    w = (torch.randn(N_OUT, K_IN, device=device) * mask).contiguous()
    x = torch.randn(29, K_IN, device=device)
    dy = torch.randn(29, N_OUT, device=device)
    lay = bsl.layout_of_mask(mask, block)
    nan = float("nan")
    y = bsl.bsr_fwd_launch(x, w, lay, None, out=torch.full((29, N_OUT), nan, device=device))
    dx = bsl.bsr_dx_launch(dy, w, lay, out=torch.full((29, K_IN), nan, device=device))
    dw = bsl.bsr_dw_launch(dy, x, w, lay, out=torch.full((N_OUT, K_IN), nan, device=device))
    assert torch.isfinite(y).all(), "forward left elements unwritten"
    assert torch.isfinite(dx).all(), "dx left elements unwritten"
    assert torch.isfinite(dw[mask]).all(), "dW left kept weights unwritten"
    assert torch.isnan(dw[~mask]).all(), "dW wrote into pruned blocks"
    ref = (dy.double().t() @ x.double()) * mask
    torch.testing.assert_close(dw[mask].double(), ref[mask], rtol=1e-5, atol=1e-4)


def test_kernels_run_under_the_interpreter(device, monkeypatch):
    """On CUDA, or on CPU with TRITON_INTERPRET=1, the three launchers run (not the reference)."""
    calls = []
    for name in ("bsr_fwd_launch", "bsr_dx_launch", "bsr_dw_launch"):
        orig = getattr(bsl_ops, name)
        spy = lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k)  # noqa: E731
        monkeypatch.setattr(bsl_ops, name, spy)
    W = BlockSparseMatrix.from_dense(torch.randn(40, 40, device=device), (16, 16))
    W.values.requires_grad_()
    x = torch.randn(5, 40, device=device, requires_grad=True)
    block_sparse_linear(x, W).sum().backward()
    assert calls == ["bsr_fwd_launch", "bsr_dx_launch", "bsr_dw_launch"]


def test_float64_matches_the_reference(device):
    """float64 has no Triton kernel: on the CPU it takes torch.sparse BSR, elsewhere the
    reference."""
    w = torch.randn(33, 45, dtype=torch.float64, device=device)
    W = BlockSparseMatrix.from_dense(w, (16, 16), mask=torch.rand(33, 45, device=device) < 0.3)
    x = torch.randn(4, 45, dtype=torch.float64, device=device)
    torch.testing.assert_close(
        block_sparse_linear(x, W), block_sparse_linear_reference(x, W), rtol=1e-12, atol=1e-12
    )


def test_cpu_path_gradients(monkeypatch):
    """The CPU path (torch.sparse BSR, no interpreter) passes gradcheck: gradients to x and to
    the values at stored blocks only."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    w = torch.randn(40, 36, dtype=torch.float64)
    mask = _block_mask("random", (40, 36), (16, 16), "cpu")
    W = BlockSparseMatrix.from_dense(w, (16, 16), mask=mask)
    W.values.requires_grad_()
    torch.autograd.gradcheck(
        lambda v, x: block_sparse_linear(
            x, BlockSparseMatrix(v, W.row_ptr, W.col_idx, W.shape, W.block_size)
        ),
        (W.values, torch.randn(3, 36, dtype=torch.float64, requires_grad=True)),
    )


def test_errors_name_expected_and_got(device):
    W = BlockSparseMatrix.from_dense(torch.randn(40, 40, device=device), (16, 16))
    with pytest.raises(ValueError, match=r"\[\.\.\., 40\].*got \[3, 39\]"):
        block_sparse_linear(torch.randn(3, 39, device=device), W)
    with pytest.raises(TypeError, match=r"expected x of the weight.s dtype torch.float32, got"):
        block_sparse_linear(torch.randn(3, 40, device=device, dtype=torch.float16), W)
    with pytest.raises(TypeError, match="BlockSparseMatrix, got Tensor"):
        block_sparse_linear(torch.randn(3, 40, device=device), torch.randn(40, 40))
    with pytest.raises(ValueError, match=r"expected bias of shape \[40\], got \[7\]"):
        block_sparse_linear(torch.randn(3, 40, device=device), W, torch.randn(7, device=device))
    w = torch.randn(40, 40, device=device)
    with pytest.raises(TypeError, match="expected mask of dtype torch.bool, got torch.float32"):
        block_masked_linear(torch.randn(3, 40, device=device), w, torch.ones(40, 40), None, 16)


def test_strided_weight_mask_and_bias(device):
    """A transposed weight and mask and a strided bias run (on contiguous copies), with the
    gradient landing on the strided weight."""
    wt = torch.randn(40, 36, device=device)
    w = wt.t().requires_grad_()  # [36, 40], column-major
    mask = (torch.rand(40, 36, device=device) < 0.5).t()
    mask[:16, :16] = False
    bias = torch.randn(72, device=device)[::2]
    x = torch.randn(5, 40, device=device, requires_grad=True)
    y = block_masked_linear(x, w, mask, bias, 16)
    dy = torch.randn_like(y)
    y.backward(dy)
    wr = w.detach().double().requires_grad_()
    xr = x.detach().double().requires_grad_()
    yr = torch.nn.functional.linear(xr, wr * mask, bias.double())
    yr.backward(dy.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), wr.grad * mask, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("holes", [False, True], ids=["whole_blocks", "holes_in_blocks"])
def test_dw_split_reduction(holes, device):
    """Batches over 64 rows split dW's reduction (2 ways under the interpreter) into fp32
    partials that a second kernel sums and writes: same result, pruned blocks never written."""
    block = (16, 32)
    M = 150
    assert dw_splits(9, M) >= 2 or device.type == "cuda"
    mask = _block_mask("empty_rows_cols", (N_OUT, K_IN), block, device)
    if holes:
        mask &= torch.rand(N_OUT, K_IN, device=device) < 0.7
    w = (torch.randn(N_OUT, K_IN, device=device) * mask).contiguous()
    x = torch.randn(M, K_IN, device=device)
    dy = torch.randn(M, N_OUT, device=device)
    lay = bsl.layout_of_mask(mask, block)
    assert (lay.keep is not None) == holes
    dw = bsl.bsr_dw_launch(
        dy, x, w, lay, out=torch.full((N_OUT, K_IN), float("nan"), device=device)
    )
    ref = (dy.double().t() @ x.double()) * mask
    kept_blocks = block_occupancy(mask, block)
    in_blocks = kept_blocks.repeat_interleave(16, 0).repeat_interleave(32, 1)[:N_OUT, :K_IN]
    assert torch.isnan(dw[~in_blocks]).all(), "dW wrote into pruned blocks"
    _close(dw[in_blocks], ref[in_blocks], torch.float32, M, "dW (split)")
    # compact storage through the same split path
    W = BlockSparseMatrix.from_dense(w, block, mask=mask)
    g = bsl.bsr_dw_launch(dy, x, W.values, bsl.layout_of_matrix(W))
    dense_g = BlockSparseMatrix(g, W.row_ptr, W.col_idx, W.shape, block).to_dense()
    _close(
        dense_g, (dy.double().t() @ x.double()) * W.to_mask(), torch.float32, M, "dvalues (split)"
    )
