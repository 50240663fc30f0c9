"""Block-sparse 2-D convolution: implicit-GEMM Triton kernels that visit only the kept blocks of the
weight, in the forward, dX and dW (groups=1, NCHW in and out).

The weight's GEMM view is TAP-MAJOR: ``W [C_out, C_in, kH, kW]`` is seen as the matrix
``[C_out, kH*kW*C_in_pad]`` with columns ordered (kh, kw, ci) and ``C_in`` padded to a multiple of
``bk`` per tap, so every ``bm x bk`` block holds ``bm`` output channels x ``bk`` input channels of
ONE kernel tap (kh, kw). Why not PyTorch's (ci, kh, kw) order: there a block straddles taps and
channels, so the activation operand of a block would need a different spatial shift per column,
which no tile-level ``tl.dot`` can express. With one tap per block:

* forward ``y[(n,oh,ow), co-block r] += x_shift(kh,kw)[(n,oh,ow), ci-block] @ block^T``:
  ``_bsc_fwd_kernel``, one program per (row tile of output pixels, block-row r), walking r's stored
  blocks; the x tile is the input shifted by the block's tap (zero outside the image).
* dX ``dx[(n,ih,iw), ci-block c] += dy_gather(kh,kw)[(n,ih,iw), co-block] @ block``: the gather
  form (``oh = (ih + p - kh*d) / s`` must be whole and in range; that test is the load mask), one
  program per (row tile of input pixels, channel block), walking the stored blocks of the block
  columns (tap, c) for every tap through the transpose metadata. Every dx element is written once
  (no atomics). At stride s the mask rejects all but 1/(sH*sW) of the loaded dy rows (AlexNet
  conv1, stride 4: the only strided layer of AlexNet/VGG-16, whose dx is not needed).
* dW ``block p = dy[:, co-block]^T @ x_shift[:, ci-block]``, reduced over all N*OH*OW output
  pixels (VGG-16 conv1_2 at batch 64: 3.2 M): ``_bsc_dw_kernel`` splits that reduction over a
  second grid axis into fp32 partials per stored block (deterministic, no atomics) that
  ``block_sparse_linear.bsr_dw_reduce_kernel`` (shared with the linear dW) sums and writes to
  the stored block, masked inside the block if the mask has holes there. Pruned blocks get no
  program.

Storages, as in ``block_sparse_linear``: a dense contiguous ``weight`` with a block-structured bool
``mask`` (``block_masked_conv2d``: SparseConv2d's block mode, any optimizer, the mask invariant)
or compact ``values [nnz, bm, bk]`` of a :class:`BlockSparseMatrix` of the tap-major view
(``block_sparse_conv2d``: inference, memory falls with density).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sparsekern.formats.block_sparse import BlockSparseMatrix, block_size_pair
from sparsekern.ops._block_kernels import (
    Layout,
    block_keep,
    block_offsets,
    bsr_dw_reduce_kernel,
    dw_splits,
    layout_from_occupancy,
    load_block,
)
from sparsekern.ops._conv import conv_out_size, conv_pair
from sparsekern.ops._dispatch import use_kernels
from sparsekern.ops._launch import KERNEL_DTYPES, dot_precision, interpreter_upcast, out_tensor
from sparsekern.ops._mask_cache import cached_on_mask
from sparsekern.ops._tiles import batch_tile_configs
from sparsekern.ops._triton import require_triton, tl, triton
from sparsekern.ops.block_sparse_linear import layout_of_matrix
from sparsekern.ops.masked_conv2d import masked_conv2d

__all__ = [
    "block_masked_conv2d",
    "block_sparse_conv2d",
    "block_sparse_conv2d_reference",
    "conv_block_occupancy",
    "conv_weight_to_gemm",
    "conv_weight_from_gemm",
    "bsc_fwd_launch",
    "bsc_dx_launch",
    "bsc_dw_launch",
    "conv_layout_of_mask",
    "conv_layout_of_matrix",
]

# (BLOCK_M, num_warps, num_stages); BLOCK_M: output pixels per program (forward), input pixels
# (dX), or reduction rows per step (dW).
_GPU_CONFIGS = {
    "fwd": [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (64, 4, 4)],
    "dx": [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (64, 4, 4)],
    "dw": [(64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4)],
}
_INTERPRETER_CONFIG = (32, 4, 1)
_KEY = ["M", "C_out", "C_in", "BM", "BK", "KH", "KW"]


def _conv_precision(dtype: torch.dtype) -> str:
    # fp32 uses TF32 exactly when F.conv2d would: cuDNN follows torch.backends.cudnn.allow_tf32
    # (True by default, unlike cuBLAS's matmul flag).
    return dot_precision(dtype, torch.backends.cudnn.allow_tf32)


def _configs(kind: str) -> list:
    return batch_tile_configs(_GPU_CONFIGS[kind], _INTERPRETER_CONFIG)


# ---------------------------------------------------------------------------------------------
# The tap-major GEMM view
# ---------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def conv_weight_to_gemm(w: torch.Tensor, bk: int) -> torch.Tensor:
    """``[C_out, C_in, kH, kW] -> [C_out, kH*kW*C_in_pad]`` (columns (kh, kw, ci), ``C_in`` padded
    with zeros (False for a bool mask) to a multiple of ``bk``)."""
    if w.dtype == torch.bool:  # padded as bytes: constant padding of bool is not in every torch
        return conv_weight_to_gemm(w.view(torch.uint8), bk).view(torch.bool)
    c_out, c_in, kh, kw = w.shape
    t = w.permute(0, 2, 3, 1)  # [C_out, kH, kW, C_in]
    t = F.pad(t, (0, _cdiv(c_in, bk) * bk - c_in))
    return t.reshape(c_out, -1)


def conv_weight_from_gemm(g: torch.Tensor, shape, bk: int) -> torch.Tensor:
    """Inverse of :func:`conv_weight_to_gemm` (drops the channel padding)."""
    c_out, c_in, kh, kw = shape
    t = g.reshape(c_out, kh, kw, _cdiv(c_in, bk) * bk)[..., :c_in]
    return t.permute(0, 3, 1, 2).contiguous()


def conv_block_occupancy(mask: torch.Tensor, block_size) -> torch.Tensor:
    """``[ceil(C_out/bm), kH*kW*ceil(C_in/bk)]`` bool: blocks of the tap-major view holding any
    True of the 4-D ``mask``."""
    bm, bk = block_size_pair(block_size)
    g = conv_weight_to_gemm(mask, bk).view(torch.uint8)  # amax over bytes
    rows, cols = g.shape
    R = _cdiv(rows, bm)
    g = F.pad(g, (0, 0, 0, R * bm - rows))
    return g.view(R, bm, cols // bk, bk).amax(dim=(1, 3)).bool()


def _compute_conv_mask_layout(mask: torch.Tensor, block) -> Layout:
    bm, bk = block
    c_out, c_in, kh, kw = mask.shape
    CB = _cdiv(c_in, bk)
    occ = conv_block_occupancy(mask, block)
    full = conv_block_occupancy(~mask, block).logical_not()
    # A block that is partly outside the matrix (ragged C_out / C_in) counts as full when all its
    # in-bounds weights are kept: the padding is never loaded.
    whole = bool((full | ~occ).all())
    s_o, s_c, s_h, s_w = c_in * kh * kw, kh * kw, kw, 1  # contiguous [C_out, C_in, kH, kW]

    def blk_off(r, c):
        tap, cb = c // CB, c % CB
        return r * (bm * s_o) + cb * (bk * s_c) + (tap // kw) * s_h + (tap % kw) * s_w

    keep = None if whole else mask.view(torch.uint8)
    return layout_from_occupancy(occ, mask.shape, block, blk_off, (s_o, s_c), keep)


def conv_layout_of_mask(mask: torch.Tensor, block_size) -> Layout:
    """Layout of a dense contiguous conv weight whose kept blocks (tap-major view) are those of
    ``mask`` holding any True. Cached on the mask; recomputed when it changes in place."""
    block = block_size_pair(block_size)
    return cached_on_mask(mask, f"bsc:{block}", lambda m: _compute_conv_mask_layout(m, block))


def conv_layout_of_matrix(w: BlockSparseMatrix, weight_shape) -> Layout:
    """Layout of compact values: ``w`` is the BlockSparseMatrix of the tap-major view. The same
    metadata as the matrix's own layout; only ``shape`` is the conv weight's."""
    return layout_of_matrix(w)._replace(shape=tuple(weight_shape))


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tap(c, CB, KW):
    """Block column -> (kh, kw, channel block)."""
    t = c // CB
    return t // KW, t % KW, c % CB


@triton.autotune(configs=_configs("fwd"), key=_KEY)
@triton.jit
def _bsc_fwd_kernel(
    x_ptr, w_ptr, blk_off_ptr, row_ptr_ptr, col_idx_ptr, keep_ptr, bias_ptr, y_ptr,
    M, C_out, C_in, H, W, OH, OW, KH, KW, CB, NUM_BLOCK_ROWS,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    stride_wr, stride_wc,
    sy_n, sy_c, sy_h, sy_w,
    HAS_BIAS: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """y[n, co, oh, ow] over output-pixel rows (n, oh, ow) x the bm channels of block-row r."""
    pid = tl.program_id(0)
    r = pid % NUM_BLOCK_ROWS
    pid_m = pid // NUM_BLOCK_ROWS
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m < M
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    n = t // OH
    offs_i = tl.arange(0, BM)
    offs_j = tl.arange(0, BK)
    co = r * BM + offs_i
    co_ok = co < C_out
    start = tl.load(row_ptr_ptr + r)
    end = tl.load(row_ptr_ptr + r + 1)
    acc = tl.zeros((BLOCK_M, BM), dtype=tl.float32)
    for p in range(start, end):
        c = tl.load(col_idx_ptr + p)
        off = tl.load(blk_off_ptr + p)
        kh, kw, cb = _tap(c, CB, KW)
        ci = (cb * BK + offs_j).to(tl.int64)
        ci_ok = ci < C_in
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_offs = (n * sx_n + ih * sx_h + iw * sx_w)[:, None] + (ci * sx_c)[None, :]
        a = tl.load(x_ptr + x_offs, mask=pix_ok[:, None] & ci_ok[None, :], other=0.0)
        w_off = block_offsets(off, stride_wr, stride_wc, BM, BK)
        w = load_block(w_ptr, keep_ptr, w_off, co_ok[:, None] & ci_ok[None, :], MASKED)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    y_offs = (n * sy_n + oh * sy_h + ow * sy_w)[:, None] + (co.to(tl.int64) * sy_c)[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])


@triton.autotune(configs=_configs("dx"), key=_KEY)
@triton.jit
def _bsc_dx_kernel(
    dy_ptr, w_ptr, t_off_ptr, col_ptr_ptr, t_row_ptr, keep_ptr, dx_ptr,
    M, C_out, C_in, H, W, OH, OW, KH, KW, CB,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdy_n, sdy_c, sdy_h, sdy_w,
    stride_wr, stride_wc,
    sdx_n, sdx_c, sdx_h, sdx_w,
    MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dx[n, ci, ih, iw] over input-pixel rows (n, ih, iw) x the bk channels of channel block cb;
    sums every tap's stored blocks in block column (tap, cb)."""
    pid = tl.program_id(0)
    cb = pid % CB
    pid_m = pid // CB
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m < M
    iw = offs_m % W
    t = offs_m // W
    ih = t % H
    n = t // H
    offs_i = tl.arange(0, BM)
    offs_j = tl.arange(0, BK)
    ci = (cb * BK + offs_j).to(tl.int64)
    ci_ok = ci < C_in
    acc = tl.zeros((BLOCK_M, BK), dtype=tl.float32)
    for tap in range(0, KH * KW):
        kh = tap // KW
        kw = tap % KW
        th = ih + pad_h - kh * dil_h
        tw = iw + pad_w - kw * dil_w
        ok = m_ok & (th >= 0) & (tw >= 0) & (th % stride_h == 0) & (tw % stride_w == 0)
        oh = th // stride_h
        ow = tw // stride_w
        ok = ok & (oh < OH) & (ow < OW)
        dy_row = n * sdy_n + oh * sdy_h + ow * sdy_w
        c = tap * CB + cb
        start = tl.load(col_ptr_ptr + c)
        end = tl.load(col_ptr_ptr + c + 1)
        for q in range(start, end):
            r = tl.load(t_row_ptr + q)
            off = tl.load(t_off_ptr + q)
            co = (r * BM + offs_i).to(tl.int64)
            co_ok = co < C_out
            a = tl.load(
                dy_ptr + dy_row[:, None] + (co * sdy_c)[None, :],
                mask=ok[:, None] & co_ok[None, :],
                other=0.0,
            )
            w_off = block_offsets(off, stride_wr, stride_wc, BM, BK)
            w = load_block(w_ptr, keep_ptr, w_off, co_ok[:, None] & ci_ok[None, :], MASKED)
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    dx_offs = (n * sdx_n + ih * sdx_h + iw * sdx_w)[:, None] + (ci * sdx_c)[None, :]
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & ci_ok[None, :])


@triton.autotune(configs=_configs("dw"), key=_KEY + ["CHUNK"])
@triton.jit
def _bsc_dw_kernel(
    dy_ptr, x_ptr, block_row_ptr, col_idx_ptr, part_ptr,
    M, C_out, C_in, H, W, OH, OW, KH, KW, CB, CHUNK, NNZ,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sx_n, sx_c, sx_h, sx_w,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """part[s, p] = sum over output pixels [s*CHUNK, (s+1)*CHUNK) of dy[:, co-block]^T x_shift."""
    p = tl.program_id(0)
    s = tl.program_id(1)
    r = tl.load(block_row_ptr + p)
    c = tl.load(col_idx_ptr + p)
    kh, kw, cb = _tap(c, CB, KW)
    offs_i = tl.arange(0, BM)
    offs_j = tl.arange(0, BK)
    co = (r * BM + offs_i).to(tl.int64)
    ci = (cb * BK + offs_j).to(tl.int64)
    co_ok = co < C_out
    ci_ok = ci < C_in
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    m_start = s.to(tl.int64) * CHUNK
    m_end = tl.minimum(m_start + CHUNK, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_ok = offs_m < m_end
        ow = offs_m % OW
        t = offs_m // OW
        oh = t % OH
        n = t // OH
        a = tl.load(
            dy_ptr + (co * sdy_c)[:, None] + (n * sdy_n + oh * sdy_h + ow * sdy_w)[None, :],
            mask=co_ok[:, None] & m_ok[None, :],
            other=0.0,
        )  # [BM, BLOCK_M]
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(
            x_ptr + (n * sx_n + ih * sx_h + iw * sx_w)[:, None] + (ci * sx_c)[None, :],
            mask=pix_ok[:, None] & ci_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BK]
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    base = (s.to(tl.int64) * NNZ + p) * (BM * BK)
    tl.store(part_ptr + base + offs_i[:, None] * BK + offs_j[None, :], acc)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _check(name, lay: Layout, w: torch.Tensor, **acts) -> None:
    if w.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: kernels take float16, bfloat16 or float32, got {w.dtype}")
    for k, t in acts.items():
        if t.dim() != 4:
            raise ValueError(f"{name}: {k} must be 4-D NCHW, got shape {list(t.shape)}")
        if t.dtype != w.dtype or t.device != w.device:
            raise TypeError(
                f"{name}: {k} must be {w.dtype} on {w.device}, got {t.dtype} on {t.device}"
            )


def _geom(geometry):
    (sh, sw), (ph, pw), (dh, dw) = geometry
    return sh, sw, ph, pw, dh, dw


def bsc_fwd_launch(x, w, lay: Layout, bias, geometry, out=None) -> torch.Tensor:
    """``y [N, C_out, OH, OW]`` from ``x [N, C_in, H, W]`` and the stored blocks of ``w``."""
    _check("block_sparse_conv2d forward", lay, w, x=x)
    c_out, c_in, KH, KW = lay.shape
    sh, sw, ph, pw, dh, dw = _geom(geometry)
    B, _, H, W = x.shape
    OH, OW = conv_out_size(H, KH, sh, ph, dh), conv_out_size(W, KW, sw, pw, dw)
    y = out_tensor(out, (B, c_out, OH, OW), x, x.dtype)
    M = B * OH * OW
    if M == 0:
        return y
    R = _cdiv(c_out, lay.block[0])
    CB = _cdiv(c_in, lay.block[1])
    keep, masked = block_keep(lay)
    grid = lambda meta: (R * triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _bsc_fwd_kernel[grid](
        x, w, lay.blk_off, lay.row_ptr, lay.col_idx, keep, bias if bias is not None else x, y,
        M, c_out, c_in, H, W, OH, OW, KH, KW, CB, R,
        sh, sw, ph, pw, dh, dw,
        *x.stride(), *lay.strides, *y.stride(),
        HAS_BIAS=bias is not None, MASKED=masked, UPCAST=interpreter_upcast(x.dtype),
        PRECISION=_conv_precision(x.dtype), BM=lay.block[0], BK=lay.block[1],
    )  # fmt: skip
    return y


def bsc_dx_launch(dy, w, lay: Layout, x_shape, geometry, out=None) -> torch.Tensor:
    """``dx [N, C_in, H, W]`` from ``dy [N, C_out, OH, OW]`` and the stored blocks of ``w``."""
    _check("block_sparse_conv2d dx", lay, w, dy=dy)
    c_out, c_in, KH, KW = lay.shape
    sh, sw, ph, pw, dh, dw = _geom(geometry)
    B, _, H, W = x_shape
    OH, OW = dy.shape[2], dy.shape[3]
    dx = out_tensor(out, (B, c_in, H, W), dy, dy.dtype)
    M = B * H * W
    if M == 0:
        return dx
    CB = _cdiv(c_in, lay.block[1])
    keep, masked = block_keep(lay)
    grid = lambda meta: (CB * triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _bsc_dx_kernel[grid](
        dy, w, lay.t_off, lay.col_ptr, lay.t_row, keep, dx,
        M, c_out, c_in, H, W, OH, OW, KH, KW, CB,
        sh, sw, ph, pw, dh, dw,
        *dy.stride(), *lay.strides, *dx.stride(),
        MASKED=masked, UPCAST=interpreter_upcast(dy.dtype),
        PRECISION=_conv_precision(dy.dtype), BM=lay.block[0], BK=lay.block[1],
    )  # fmt: skip
    return dx


def bsc_dw_launch(dy, x, w, lay: Layout, geometry, out=None) -> torch.Tensor:
    """Gradient of the storage ``w`` (its shape): stored blocks only; ``out`` must be zeroed
    (None: a fresh zeroed tensor)."""
    _check("block_sparse_conv2d dweight", lay, w, dy=dy, x=x)
    c_out, c_in, KH, KW = lay.shape
    sh, sw, ph, pw, dh, dw = _geom(geometry)
    B, _, H, W = x.shape
    OH, OW = dy.shape[2], dy.shape[3]
    g = torch.zeros_like(w, memory_format=torch.contiguous_format) if out is None else out
    if lay.nnz == 0:
        return g
    M = B * OH * OW
    S = dw_splits(lay.nnz, M)
    chunk = _cdiv(M, S)
    bm, bk = lay.block
    part = torch.empty((S, lay.nnz, bm, bk), device=w.device, dtype=torch.float32)
    CB = _cdiv(c_in, bk)
    _bsc_dw_kernel[(lay.nnz, S)](
        dy, x, lay.block_row, lay.col_idx, part,
        M, c_out, c_in, H, W, OH, OW, KH, KW, CB, chunk, lay.nnz,
        sh, sw, ph, pw, dh, dw,
        *dy.stride(), *x.stride(),
        UPCAST=interpreter_upcast(x.dtype), PRECISION=_conv_precision(x.dtype), BM=bm, BK=bk,
    )  # fmt: skip
    keep, masked = block_keep(lay)
    bsr_dw_reduce_kernel[(lay.nnz,)](
        part, lay.blk_off, lay.block_row, lay.col_idx, keep, g,
        c_out, c_in, CB, lay.nnz, S,
        *lay.strides,
        MASKED=masked, BM=bm, BK=bk,
    )  # fmt: skip
    return g


# ---------------------------------------------------------------------------------------------
# Autograd and public ops
# ---------------------------------------------------------------------------------------------
# Implementations, one per (storage, GEMM), shared by eager mode and the custom ops. geometry: the
# six ints (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w). Storage "masked": a dense weight and
# its bool mask; "compact": values with row_ptr / col_idx of the tap-major matrix.
def _geom6(geometry) -> tuple:
    g = [int(v) for v in geometry]
    return (g[0], g[1]), (g[2], g[3]), (g[4], g[5])


def _compact_conv_layout(values, row_ptr, col_idx, weight_shape) -> Layout:
    c_out, c_in, kh, kw = weight_shape
    bm, bk = values.shape[1], values.shape[2]
    cols = kh * kw * _cdiv(c_in, bk) * bk
    tag = f"bsc:{tuple(weight_shape)}:{bm}x{bk}:{id(col_idx)}:{col_idx._version}"

    def compute(rp):
        m = BlockSparseMatrix(values, rp, col_idx, (c_out, cols), (bm, bk), _validate=False)
        return conv_layout_of_matrix(m, tuple(weight_shape))

    return cached_on_mask(row_ptr, tag, compute)


def _masked_fwd(x, w, mask, bias, geometry, bm: int, bk: int):
    return bsc_fwd_launch(x, w, conv_layout_of_mask(mask, (bm, bk)), bias, _geom6(geometry))


def _masked_dx(dy, w, mask, x_shape, geometry, bm: int, bk: int):
    lay = conv_layout_of_mask(mask, (bm, bk))
    return bsc_dx_launch(dy, w, lay, tuple(x_shape), _geom6(geometry))


def _masked_dw(dy, x, w, mask, geometry, bm: int, bk: int):
    return bsc_dw_launch(dy, x, w, conv_layout_of_mask(mask, (bm, bk)), _geom6(geometry))


def _compact_fwd(x, values, row_ptr, col_idx, bias, weight_shape, geometry):
    lay = _compact_conv_layout(values, row_ptr, col_idx, weight_shape)
    return bsc_fwd_launch(x, values, lay, bias, _geom6(geometry))


def _compact_dx(dy, values, row_ptr, col_idx, x_shape, weight_shape, geometry):
    lay = _compact_conv_layout(values, row_ptr, col_idx, weight_shape)
    return bsc_dx_launch(dy, values, lay, tuple(x_shape), _geom6(geometry))


def _compact_dw(dy, x, values, row_ptr, col_idx, weight_shape, geometry):
    lay = _compact_conv_layout(values, row_ptr, col_idx, weight_shape)
    return bsc_dw_launch(dy, x, values, lay, _geom6(geometry))


_IMPLS = {
    ("masked", "fwd"): _masked_fwd, ("masked", "dx"): _masked_dx, ("masked", "dw"): _masked_dw,
    ("compact", "fwd"): _compact_fwd, ("compact", "dx"): _compact_dx,
    ("compact", "dw"): _compact_dw,
}  # fmt: skip
_OP_NAMES = {"masked": "block_masked_conv2d", "compact": "block_sparse_conv2d"}


def _out_hw(x_shape, weight_shape, geometry) -> tuple[int, int]:
    (sh, sw), (ph, pw), (dh, dw) = _geom6(geometry)
    kh, kw = weight_shape[-2:]
    return (
        conv_out_size(x_shape[2], kh, sh, ph, dh),
        conv_out_size(x_shape[3], kw, sw, pw, dw),
    )


# torch.library custom ops: opaque to torch.compile, so a compiled model runs the same kernels.
@torch.library.custom_op("sparsekern::block_masked_conv2d_fwd", mutates_args=())
def _masked_fwd_op(
    x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
    geometry: list[int], bm: int, bk: int,
) -> torch.Tensor:  # fmt: skip
    return _masked_fwd(x, w, mask, bias, geometry, bm, bk)


@_masked_fwd_op.register_fake
def _(x, w, mask, bias, geometry, bm, bk):
    return x.new_empty((x.shape[0], w.shape[0], *_out_hw(x.shape, w.shape, geometry)))


@torch.library.custom_op("sparsekern::block_masked_conv2d_dx", mutates_args=())
def _masked_dx_op(
    dy: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, x_shape: list[int],
    geometry: list[int], bm: int, bk: int,
) -> torch.Tensor:  # fmt: skip
    return _masked_dx(dy, w, mask, x_shape, geometry, bm, bk)


@_masked_dx_op.register_fake
def _(dy, w, mask, x_shape, geometry, bm, bk):
    return dy.new_empty(tuple(x_shape))


@torch.library.custom_op("sparsekern::block_masked_conv2d_dw", mutates_args=())
def _masked_dw_op(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor,
    geometry: list[int], bm: int, bk: int,
) -> torch.Tensor:  # fmt: skip
    return _masked_dw(dy, x, w, mask, geometry, bm, bk)


@_masked_dw_op.register_fake
def _(dy, x, w, mask, geometry, bm, bk):
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.library.custom_op("sparsekern::block_sparse_conv2d_fwd", mutates_args=())
def _compact_fwd_op(
    x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
    bias: torch.Tensor | None, weight_shape: list[int], geometry: list[int],
) -> torch.Tensor:  # fmt: skip
    return _compact_fwd(x, values, row_ptr, col_idx, bias, weight_shape, geometry)


@_compact_fwd_op.register_fake
def _(x, values, row_ptr, col_idx, bias, weight_shape, geometry):
    return x.new_empty((x.shape[0], weight_shape[0], *_out_hw(x.shape, weight_shape, geometry)))


@torch.library.custom_op("sparsekern::block_sparse_conv2d_dx", mutates_args=())
def _compact_dx_op(
    dy: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
    x_shape: list[int], weight_shape: list[int], geometry: list[int],
) -> torch.Tensor:  # fmt: skip
    return _compact_dx(dy, values, row_ptr, col_idx, x_shape, weight_shape, geometry)


@_compact_dx_op.register_fake
def _(dy, values, row_ptr, col_idx, x_shape, weight_shape, geometry):
    return dy.new_empty(tuple(x_shape))


@torch.library.custom_op("sparsekern::block_sparse_conv2d_dw", mutates_args=())
def _compact_dw_op(
    dy: torch.Tensor, x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
    col_idx: torch.Tensor, weight_shape: list[int], geometry: list[int],
) -> torch.Tensor:  # fmt: skip
    return _compact_dw(dy, x, values, row_ptr, col_idx, weight_shape, geometry)


@_compact_dw_op.register_fake
def _(dy, x, values, row_ptr, col_idx, weight_shape, geometry):
    return torch.empty_like(values, memory_format=torch.contiguous_format)


def _run(kind: str, gemm: str, *args):
    """One GEMM through its custom op under torch.compile, else the implementation directly."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.sparsekern, f"{_OP_NAMES[kind]}_{gemm}")(*args)
    return _IMPLS[kind, gemm](*args)


class _BlockSparseConvFunction(torch.autograd.Function):
    """Autograd over the storage tensor ``w``. ``kind`` "masked": ``a`` = mask, ``b`` = None,
    ``dims`` = (bm, bk); "compact": ``a`` = row_ptr, ``b`` = col_idx, ``dims`` = weight_shape."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, kind, dims, geometry):
        x = x if x.is_contiguous() else x.contiguous()
        geo = [v for pair in geometry for v in pair]
        if kind == "masked":
            y = _run(kind, "fwd", x, w, a, bias, geo, *dims)
            ctx.save_for_backward(x, w, a)
        else:
            y = _run(kind, "fwd", x, w, a, b, bias, list(dims), geo)
            ctx.save_for_backward(x, w, a, b)
        ctx.kind, ctx.dims, ctx.geo, ctx.has_bias = kind, dims, geo, bias is not None
        return y

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable: refuse, loudly
    def backward(ctx, dy):
        x, w, *meta = ctx.saved_tensors
        dy = dy if dy.is_contiguous() else dy.contiguous()
        kind, dims, geo = ctx.kind, ctx.dims, ctx.geo
        dx = dw = db = None
        if kind == "masked":
            if ctx.needs_input_grad[0]:
                dx = _run(kind, "dx", dy, w, meta[0], list(x.shape), geo, *dims)
            if ctx.needs_input_grad[1]:
                dw = _run(kind, "dw", dy, x, w, meta[0], geo, *dims)
        else:
            if ctx.needs_input_grad[0]:
                dx = _run(kind, "dx", dy, w, *meta, list(x.shape), list(dims), geo)
            if ctx.needs_input_grad[1]:
                dw = _run(kind, "dw", dy, x, w, *meta, list(dims), geo)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(dim=(0, 2, 3))
        return dx, dw, db, None, None, None, None, None


_WHO = "block-sparse conv2d"


def _geometry_of(stride, padding, dilation):
    return (
        conv_pair(stride, "stride", 1, _WHO),
        conv_pair(padding, "padding", 0, _WHO),
        conv_pair(dilation, "dilation", 1, _WHO),
    )


def _check_x(who, x, c_in, w, bias, c_out, geometry, kernel):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who}: x must be a floating-point [N, C_in, H, W] tensor, got {got}")
    if x.shape[1] != c_in:
        raise ValueError(f"{who}: x must have C_in={c_in} channels, got shape {list(x.shape)}")
    if x.dtype != w.dtype or x.device != w.device:
        raise TypeError(
            f"{who}: x must be {w.dtype} on {w.device} like the weight, got {x.dtype} on {x.device}"
        )
    if bias is not None and (tuple(bias.shape) != (c_out,) or bias.dtype != x.dtype):
        raise ValueError(
            f"{who}: bias must be [{c_out}] {x.dtype}, got {list(bias.shape)} {bias.dtype}"
        )
    (sh, sw), (ph, pw), (dh, dw) = geometry
    oh = conv_out_size(x.shape[2], kernel[0], sh, ph, dh)
    ow = conv_out_size(x.shape[3], kernel[1], sw, pw, dw)
    if oh < 1 or ow < 1:
        raise ValueError(
            f"{who}: output would be {oh}x{ow} for input {tuple(x.shape[2:])}, kernel {kernel}, "
            f"stride ({sh}, {sw}), padding ({ph}, {pw}), dilation ({dh}, {dw}); expected >= 1x1"
        )


def block_masked_conv2d(
    x, weight, mask, bias=None, stride=1, padding=0, dilation=1, block_size=(32, 32), *,
    assume_pruned_zero: bool = False,
) -> torch.Tensor:  # fmt: skip
    """``F.conv2d(x, weight * mask, bias, stride, padding, dilation)`` (groups=1) on a dense
    weight, the kernels skipping every all-False block of ``mask``'s tap-major view (``bm``
    output x ``bk`` input channels of one tap). ``dweight`` is exactly 0 where ``mask`` is False
    and never written at pruned blocks; pruned entries are ignored (NaN included). Where the
    Triton kernels do not run: :func:`sparsekern.ops.masked_conv2d` (``assume_pruned_zero`` passed
    on)."""
    block = block_size_pair(block_size)
    geometry = _geometry_of(stride, padding, dilation)
    if weight.dim() != 4 or mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"block_masked_conv2d: expected weight [C_out, C_in, kH, kW] and a bool mask of its "
            f"shape, got weight {list(weight.shape)}, mask {mask.dtype} {list(mask.shape)}"
        )
    c_out, c_in, kh, kw = weight.shape
    _check_x("block_masked_conv2d", x, c_in, weight, bias, c_out, geometry, (kh, kw))
    if not (use_kernels(x) and x.dtype in KERNEL_DTYPES):
        return masked_conv2d(
            x, weight, mask, bias, *geometry, assume_pruned_zero=assume_pruned_zero
        )
    require_triton("block_masked_conv2d on this device")
    # Block offsets assume [C_out, C_in, kH, kW] storage: a strided weight runs on a contiguous
    # copy (its gradient flows back through the copy).
    weight = weight if weight.is_contiguous() else weight.contiguous()
    mask = mask if mask.is_contiguous() else mask.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _BlockSparseConvFunction.apply(x, weight, bias, mask, None, "masked", block, geometry)


def block_sparse_conv2d_reference(x, weight: BlockSparseMatrix, weight_shape, bias=None,
                                  stride=1, padding=0, dilation=1) -> torch.Tensor:  # fmt: skip
    """``F.conv2d`` with the dense weight rebuilt from the tap-major ``weight``."""
    dense = conv_weight_from_gemm(weight.to_dense(), weight_shape, weight.block_size[1])
    return F.conv2d(x, dense, bias, *_geometry_of(stride, padding, dilation))


def block_sparse_conv2d(
    x, weight: BlockSparseMatrix, weight_shape, bias=None, stride=1, padding=0, dilation=1
) -> torch.Tensor:
    """Convolution with a compact block-sparse weight (groups=1).

    Args:
        x: ``[N, C_in, H, W]``.
        weight: the :class:`BlockSparseMatrix` of the tap-major view ``[C_out, kH*kW*C_in_pad]``
            (``BlockSparseMatrix.from_dense(conv_weight_to_gemm(w, bk), (bm, bk))``).
        weight_shape: ``(C_out, C_in, kH, kW)``.
    Returns:
        ``[N, C_out, OH, OW]``; gradients to ``x``, ``weight.values`` (stored blocks) and ``bias``.
    """
    if not isinstance(weight, BlockSparseMatrix):
        raise TypeError(f"block_sparse_conv2d: expected a BlockSparseMatrix, got {type(weight)}")
    c_out, c_in, kh, kw = (int(s) for s in weight_shape)
    bm, bk = weight.block_size
    want = (c_out, kh * kw * _cdiv(c_in, bk) * bk)
    if weight.shape != want:
        raise ValueError(
            f"block_sparse_conv2d: expected the tap-major view of shape {want} for weight_shape "
            f"{tuple(weight_shape)} at bk={bk}, got {weight.shape}"
        )
    geometry = _geometry_of(stride, padding, dilation)
    _check_x("block_sparse_conv2d", x, c_in, weight.values, bias, c_out, geometry, (kh, kw))
    if not (use_kernels(x) and x.dtype in KERNEL_DTYPES):
        return block_sparse_conv2d_reference(x, weight, weight_shape, bias, *geometry)
    require_triton("block_sparse_conv2d on this device")
    values = weight.values if weight.values.is_contiguous() else weight.values.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _BlockSparseConvFunction.apply(
        x, values, bias, weight.row_ptr, weight.col_idx, "compact", (c_out, c_in, kh, kw),
        geometry,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see sparsekern.ops._compile_check)
# ---------------------------------------------------------------------------------------------
_SPEC_BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (64, 128)]


def _bench_values(bm: int, bk: int) -> dict[str, dict[str, int]]:
    """Integer arguments of each kernel at the benchmark shape: VGG-16 conv3_2 (256 -> 256
    channels, 3x3, pad 1, 56x56) at batch 64, NCHW contiguous, compact storage, d = 0.1."""
    n, c, h, w = 64, 256, 56, 56
    R, CB = c // bm, c // bk
    nnz = max(1, (R * CB * 9) // 10)
    dims = {"M": n * h * w, "C_out": c, "C_in": c, "H": h, "W": w, "OH": h, "OW": w,
            "KH": 3, "KW": 3, "CB": CB}  # fmt: skip
    geo = {"stride_h": 1, "stride_w": 1, "pad_h": 1, "pad_w": 1, "dil_h": 1, "dil_w": 1}
    act = dict(zip(("n", "c", "h", "w"), (c * h * w, h * w, w, 1)))
    strides = lambda prefix: {f"{prefix}_{k}": v for k, v in act.items()}  # noqa: E731
    wst = {"stride_wr": bk, "stride_wc": 1}
    return {
        "fwd": {**dims, "NUM_BLOCK_ROWS": R, **geo, **strides("sx"), **wst, **strides("sy")},
        "dx": {**dims, **geo, **strides("sdy"), **wst, **strides("sdx")},
        "dw": {**dims, "CHUNK": n * h * w, "NNZ": nnz, **geo, **strides("sdy"), **strides("sx")},
    }


def compile_specs():
    """Yield one spec dict per kernel, block shape, config and dtype (``name``, ``fn``,
    ``signature``, ``constexprs``, ``values`` at VGG-16 conv3_2 batch 64, ``num_warps``,
    ``num_stages``, ``hot``: the bf16 configs)."""
    i32 = "i32"
    for dt in ("bf16", "fp16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        kernels = {
            "fwd": (
                _bsc_fwd_kernel,
                {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "blk_off_ptr": "*i64",
                 "row_ptr_ptr": "*i32", "col_idx_ptr": "*i32", "keep_ptr": "*u8",
                 "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}"},
                {"HAS_BIAS": True, "MASKED": False},
            ),
            "dx": (
                _bsc_dx_kernel,
                {"dy_ptr": f"*{dt}", "w_ptr": f"*{dt}", "t_off_ptr": "*i64",
                 "col_ptr_ptr": "*i32", "t_row_ptr": "*i32", "keep_ptr": "*u8",
                 "dx_ptr": f"*{dt}"},
                {"MASKED": True},
            ),
            "dw": (
                _bsc_dw_kernel,
                {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "block_row_ptr": "*i32",
                 "col_idx_ptr": "*i32", "part_ptr": "*fp32"},
                {},
            ),
        }  # fmt: skip
        for kind, (kernel, ptrs, extra) in kernels.items():
            for bm, bk in _SPEC_BLOCKS:
                values = _bench_values(bm, bk)[kind]
                sig = ptrs | {k: i32 for k in values}
                for block_m, w, s in _GPU_CONFIGS[kind]:
                    consts = {**extra, "UPCAST": False, "PRECISION": prec}
                    consts |= {"BM": bm, "BK": bk, "BLOCK_M": block_m}
                    yield {
                        "name": f"block_sparse_conv2d.{kind}[{dt},b{bm}x{bk},m{block_m},w{w},s{s}]",
                        "fn": kernel.fn,
                        "signature": sig,
                        "constexprs": consts,
                        "values": values,
                        "num_warps": w,
                        "num_stages": s,
                        "hot": dt == "bf16",
                    }
