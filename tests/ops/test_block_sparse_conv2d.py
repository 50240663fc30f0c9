"""Block-sparse conv2d (tap-major blocks): the Triton kernels through the interpreter against a
float64 F.conv2d reference, dense storage with a block mask and compact BlockSparseMatrix
storage, every gradient by name, odd sizes, strides, padding, dilation, empty and full layouts."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from sparsekern.formats.block_sparse import BlockSparseMatrix
from sparsekern.ops.block_sparse_conv2d import (
    block_masked_conv2d,
    block_sparse_conv2d,
    block_sparse_conv2d_reference,
    conv_block_occupancy,
    conv_weight_from_gemm,
    conv_weight_to_gemm,
)

bsc = importlib.import_module("sparsekern.ops.block_sparse_conv2d")
# where the autograd function looks the launchers up (what a spy must replace)
bsc_ops = importlib.import_module("sparsekern.ops.block_sparse_conv2d.custom_ops")

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _close(got, ref, dtype, reduce_len, name):
    rtol, atol = TOL[dtype]
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(
        got.double(),
        ref,
        rtol=rtol,
        atol=atol * math.sqrt(reduce_len),
        msg=lambda m: f"{name}: {m}",
    )


def _block_mask(shape, block, layout, device):
    """A 4-D bool mask made of whole tap-major blocks."""
    c_out, c_in, kh, kw = shape
    occ = conv_block_occupancy(torch.ones(shape, dtype=torch.bool, device=device), block)
    if layout == "random":
        occ = torch.rand(occ.shape, device=device) < 0.5
        occ.view(-1)[-1] = True
    elif layout == "none":
        occ[:] = False
    elif layout == "single":
        occ[:] = False
        occ[-1, occ.shape[1] // 2] = True
    bm, bk = block
    g = occ.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:c_out]
    return conv_weight_from_gemm(g.to(torch.uint8), shape, bk).bool()


def _reference(x, w, mask, b, dy, geo):
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = F.conv2d(xr, wr * mask, br, *geo)
    yr.backward(dy.double())
    return yr.detach(), xr.grad, wr.grad * mask, br.grad


# (C_out, C_in, k, stride, padding, dilation, H, W): odd channels (not multiples of 16), 1x1,
# 3x3, 5x5 stride 2, dilation, a non-square image.
CASES = [
    (20, 18, 3, 1, 1, 1, 9, 7),
    (17, 5, 5, 2, 2, 1, 11, 10),
    (33, 20, 1, 1, 0, 1, 7, 5),
    (16, 16, 3, 1, 2, 2, 8, 9),
]


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_dense_storage(case, dtype, device):
    c_out, c_in, k, s, p, d, H, W = case
    geo = ((s, s), (p, p), (d, d))
    shape = (c_out, c_in, k, k)
    mask = _block_mask(shape, (16, 16), "random", device)
    w = (torch.randn(shape, device=device) * mask).to(dtype).requires_grad_()
    x = torch.randn(2, c_in, H, W, device=device).to(dtype).requires_grad_()
    b = torch.randn(c_out, device=device).to(dtype).requires_grad_()
    y = block_masked_conv2d(x, w, mask, b, s, p, d, (16, 16))
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, dbr = _reference(x, w, mask, b, dy, geo)
    red_w = 2 * y.shape[2] * y.shape[3]
    _close(y, yr, dtype, c_in * k * k, "y")
    _close(x.grad, dxr, dtype, c_out * k * k, "dx")
    _close(w.grad, dwr, dtype, red_w, "dweight")
    _close(b.grad, dbr, dtype, red_w, "dbias")
    assert (w.grad[~mask] == 0).all(), "dweight: nonzero at a pruned weight"


@pytest.mark.parametrize("layout", ["random", "single", "none", "full"])
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 32)], ids=str)
def test_compact_storage_layouts(layout, block, device):
    c_out, c_in, k = 40, 21, 3
    shape = (c_out, c_in, k, k)
    mask = _block_mask(shape, block, layout, device)
    w = torch.randn(shape, device=device) * mask
    bk = block[1]
    W = BlockSparseMatrix.from_dense(
        conv_weight_to_gemm(w, bk), block, mask=conv_weight_to_gemm(mask.to(torch.uint8), bk).bool()
    )
    W.values.requires_grad_()
    x = torch.randn(2, c_in, 6, 7, device=device, requires_grad=True)
    b = torch.randn(c_out, device=device, requires_grad=True)
    y = block_sparse_conv2d(x, W, shape, b, 1, 1, 1)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, dbr = _reference(x, w, mask, b, dy, ((1, 1), (1, 1), (1, 1)))
    _close(y, yr, torch.float32, c_in * 9, "y")
    _close(x.grad, dxr, torch.float32, c_out * 9, "dx")
    _close(b.grad, dbr, torch.float32, 84, "dbias")
    g = BlockSparseMatrix(W.values.grad, W.row_ptr, W.col_idx, W.shape, W.block_size)
    _close(conv_weight_from_gemm(g.to_dense(), shape, bk), dwr, torch.float32, 84, "dvalues")


@pytest.mark.parametrize("block", [(64, 64), (128, 32), (32, 128)], ids=str)
def test_large_and_rectangular_blocks(block, device):
    """The big block shapes (ragged on both sides: 70 output, 40 input channels), both storages,
    channels_last input: no conversion."""
    shape = (70, 40, 3, 3)
    mask = _block_mask(shape, block, "random", device)
    w = torch.randn(shape, device=device) * mask
    x = torch.randn(1, 40, 5, 4, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    wd = w.clone().requires_grad_()
    y = block_masked_conv2d(x, wd, mask, None, 1, 1, 1, block)
    assert y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(y)
    y.backward(dy)
    b = torch.zeros(70, device=device)
    yr, dxr, dwr, _ = _reference(x, w, mask, b, dy, ((1, 1), (1, 1), (1, 1)))
    _close(y, yr, torch.float32, 360, "y")
    _close(x.grad, dxr, torch.float32, 630, "dx")
    _close(wd.grad, dwr, torch.float32, 20, "dweight")
    bk = block[1]
    W = BlockSparseMatrix.from_dense(
        conv_weight_to_gemm(w, bk), block, mask=conv_weight_to_gemm(mask.to(torch.uint8), bk).bool()
    )
    y2 = block_sparse_conv2d(x.detach(), W, shape, None, 1, 1, 1)
    _close(y2, yr, torch.float32, 360, "y (compact)")


def test_alexnet_conv1_geometry(device):
    """11x11, stride 4, padding 2 (AlexNet's conv1) with tiny channel counts."""
    shape = (18, 3, 11, 11)
    mask = _block_mask(shape, (16, 16), "random", device)
    w = (torch.randn(shape, device=device) * mask).requires_grad_()
    x = torch.randn(1, 3, 19, 19, device=device, requires_grad=True)
    b = torch.randn(18, device=device, requires_grad=True)
    y = block_masked_conv2d(x, w, mask, b, 4, 2, 1, 16)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, _ = _reference(x, w, mask, b, dy, ((4, 4), (2, 2), (1, 1)))
    _close(y, yr, torch.float32, 363, "y")
    _close(x.grad, dxr, torch.float32, 18 * 121, "dx")
    _close(w.grad, dwr, torch.float32, 16, "dweight")


def test_holes_inside_kept_blocks_are_applied(device):
    shape = (20, 18, 3, 3)
    mask = _block_mask(shape, (16, 16), "random", device)
    mask &= torch.rand(shape, device=device) < 0.6
    w = torch.randn(shape, device=device, requires_grad=True)  # pruned weights NOT zero
    x = torch.randn(2, 18, 6, 6, device=device, requires_grad=True)
    b = torch.randn(20, device=device, requires_grad=True)
    assert bsc.conv_layout_of_mask(mask, 16).base.keep is not None
    y = block_masked_conv2d(x, w, mask, b, 1, 1, 1, 16)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, _ = _reference(x, w, mask, b, dy, ((1, 1), (1, 1), (1, 1)))
    _close(y, yr, torch.float32, 162, "y")
    _close(x.grad, dxr, torch.float32, 180, "dx")
    _close(w.grad, dwr, torch.float32, 72, "dweight")
    assert (w.grad[~mask] == 0).all()


def test_poisoned_outputs_and_untouched_pruned_blocks(device):
    shape = (20, 18, 3, 3)
    mask = _block_mask(shape, (16, 16), "random", device)
    w = bsc.nhwc(torch.randn(shape, device=device) * mask)  # the launchers take channels_last
    x = bsc.nhwc(torch.randn(2, 18, 7, 6, device=device))
    lay = bsc.conv_layout_of_mask(mask, (16, 16))
    geo = ((1, 1), (1, 1), (1, 1))
    nan = float("nan")
    y = bsc.bsc_fwd_launch(x, w, lay, None, geo, out=torch.full((2, 20, 7, 6), nan, device=device))
    assert torch.isfinite(y).all()
    dy = bsc.nhwc(torch.randn_like(y))
    dx = bsc.bsc_dx_launch(dy, w, lay, x.shape, geo, out=torch.full_like(x, nan))
    assert torch.isfinite(dx).all()
    dw = bsc.bsc_dw_launch(dy, x, w, lay, geo, out=torch.full_like(w, nan))
    assert torch.isfinite(dw[mask]).all(), "dW left kept weights unwritten"
    assert torch.isnan(dw[~mask]).all(), "dW wrote into pruned blocks"


def test_kernels_run_and_reference_matches(device, monkeypatch):
    calls = []
    for name in ("bsc_fwd_launch", "bsc_dx_launch", "bsc_dw_launch"):
        orig = getattr(bsc_ops, name)
        spy = lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k)  # noqa: E731
        monkeypatch.setattr(bsc_ops, name, spy)
    shape = (16, 16, 3, 3)
    w = torch.randn(shape, device=device, requires_grad=True)
    x = torch.randn(1, 16, 5, 5, device=device, requires_grad=True)
    block_masked_conv2d(
        x, w, torch.ones(shape, dtype=torch.bool, device=device), None, 1, 1, 1, 16
    ).sum().backward()
    assert calls == ["bsc_fwd_launch", "bsc_dx_launch", "bsc_dw_launch"]
    W = BlockSparseMatrix.from_dense(conv_weight_to_gemm(w.detach().double(), 16), 16)
    xd = x.detach().double()
    torch.testing.assert_close(
        block_sparse_conv2d(xd, W, shape, None, 1, 1, 1),
        block_sparse_conv2d_reference(xd, W, shape, None, 1, 1, 1),
    )


def test_gemm_view_round_trip_and_errors(device):
    w = torch.randn(5, 7, 3, 2, device=device)
    g = conv_weight_to_gemm(w, 16)
    assert g.shape == (5, 3 * 2 * 16)
    assert torch.equal(conv_weight_from_gemm(g, w.shape, 16), w)
    W = BlockSparseMatrix.from_dense(g, 16)
    x = torch.randn(1, 7, 5, 5, device=device)
    with pytest.raises(ValueError, match=r"tap-major view of shape \(5, 144\).*got \(5, 96\)"):
        block_sparse_conv2d(x, W, (5, 7, 3, 3))
    with pytest.raises(ValueError, match="C_in=7 channels, got shape"):
        block_sparse_conv2d(torch.randn(1, 6, 5, 5, device=device), W, (5, 7, 3, 2))
    with pytest.raises(ValueError, match="output would be"):
        block_masked_conv2d(
            torch.randn(1, 7, 2, 2, device=device), w, torch.ones_like(w, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match=r"expected stride >= 1, got 0"):
        block_masked_conv2d(x, w, torch.ones_like(w, dtype=torch.bool), stride=0)


def _tap_mask(shape, blocks):
    """A 4-D mask keeping the tap-major 16 x 16 blocks ``blocks`` ((block row, block col))."""
    occ = conv_block_occupancy(torch.zeros(shape, dtype=torch.bool), (16, 16))
    for r, c in blocks:
        occ[r, c] = True
    g = occ.repeat_interleave(16, 0).repeat_interleave(16, 1)[: shape[0]]
    return conv_weight_from_gemm(g.to(torch.uint8), shape, 16).bool()


@pytest.mark.parametrize("edit", ["col_idx", "row_ptr_and_col_idx"])
def test_compact_layout_is_recomputed_after_in_place_index_edits(edit, device):
    """The conv layout of a BlockSparseMatrix (dX block lists included) is cached on its index
    tensors; editing them in place (the same tensor objects, so identity alone cannot tell) must
    never leave the old layout in use: output and every gradient match the new structure."""
    shape = (32, 16, 3, 3)  # tap-major view: 2 block rows x 9 block columns
    old = [(0, 0), (0, 3), (1, 4)]
    new = [(0, 1), (0, 5), (1, 8)] if edit == "col_idx" else [(0, 2), (1, 6), (1, 7)]
    x = torch.randn(2, 16, 5, 6, device=device)

    def gemm(mask):
        w = torch.randn(shape, device=device) * mask
        W = BlockSparseMatrix.from_dense(
            conv_weight_to_gemm(w, 16), (16, 16), mask=conv_weight_to_gemm(mask, 16)
        )
        return w, W

    w_old, W = gemm(_tap_mask(shape, old).to(device))
    W.values.requires_grad_()
    block_sparse_conv2d(x, W, shape, None, 1, 1, 1).sum().backward()  # caches the old layout
    mask = _tap_mask(shape, new).to(device)
    w_new, W_new = gemm(mask)
    with torch.no_grad():
        W.values.copy_(W_new.values)
        W.values.grad = None
    if edit == "col_idx":
        assert torch.equal(W.row_ptr, W_new.row_ptr)  # same rows: only the columns move
    else:
        assert not torch.equal(W.row_ptr, W_new.row_ptr)
        W.row_ptr.copy_(W_new.row_ptr)
    W.col_idx.copy_(W_new.col_idx)
    W._derive()  # the matrix's own transposed lists, as its constructor makes them
    xg = x.clone().requires_grad_()
    y = block_sparse_conv2d(xg, W, shape, None, 1, 1, 1)
    dy = torch.randn_like(y)
    y.backward(dy)
    b = torch.zeros(32, device=device)
    yr, dxr, dwr, _ = _reference(xg, w_new, mask, b, dy, ((1, 1), (1, 1), (1, 1)))
    _close(y, yr, torch.float32, 16 * 9, "y")
    _close(xg.grad, dxr, torch.float32, 32 * 9, "dx")
    g = BlockSparseMatrix(W.values.grad, W.row_ptr, W.col_idx, W.shape, W.block_size)
    _close(conv_weight_from_gemm(g.to_dense(), shape, 16), dwr, torch.float32, 60, "dvalues")


def test_block_sparse_conv2d_layer_follows_in_place_edits_of_its_index_buffers(device):
    """BlockSparseConv2d assembles its matrix (derived lists included) and the kernels' layout
    from its buffers: in-place edits of ``row_ptr`` and ``col_idx`` (the same tensor objects)
    must rebuild both, never reuse them."""
    from sparsekern.nn.inference import BlockSparseConv2d

    shape = (32, 16, 3, 3)
    old, new = [(0, 0), (0, 3), (1, 4)], [(0, 2), (1, 6), (1, 7)]  # 2 + 1 blocks -> 1 + 2
    x = torch.randn(2, 16, 5, 6, device=device)

    def matrix(mask):
        w = torch.randn(shape, device=device) * mask
        g = conv_weight_to_gemm(w, 16)
        return w, BlockSparseMatrix.from_dense(g, (16, 16), mask=conv_weight_to_gemm(mask, 16))

    _, W_old = matrix(_tap_mask(shape, old).to(device))
    layer = BlockSparseConv2d(W_old, shape, None, (1, 1), (1, 1), (1, 1))
    layer(x)  # builds and caches the matrix and its layout
    mask = _tap_mask(shape, new).to(device)
    w_new, W_new = matrix(mask)
    with torch.no_grad():
        layer.row_ptr.copy_(W_new.row_ptr)
        layer.col_idx.copy_(W_new.col_idx)
        layer.values.copy_(W_new.values)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    dy = torch.randn_like(y)
    y.backward(dy)
    b = torch.zeros(32, device=device)
    yr, dxr, dwr, _ = _reference(xg, w_new, mask, b, dy, ((1, 1), (1, 1), (1, 1)))
    _close(y, yr, torch.float32, 16 * 9, "y after the in-place edit")
    _close(xg.grad, dxr, torch.float32, 32 * 9, "dx after the in-place edit")
    g = BlockSparseMatrix(layer.values.grad, W_new.row_ptr, W_new.col_idx, W_new.shape, (16, 16))
    _close(conv_weight_from_gemm(g.to_dense(), shape, 16), dwr, torch.float32, 60, "dvalues")
