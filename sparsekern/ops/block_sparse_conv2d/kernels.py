"""The Triton side of block_sparse_conv2d: implicit-GEMM kernels on channels_last (NHWC)
activations that visit only the kept blocks of the weight's tap-major view, and their launchers
(check, allocate, launch).

* forward ``y[(n,oh,ow), co-block r] += x_shift(kh,kw)[(n,oh,ow), ci-block] @ block^T``:
  ``_bsc_fwd_kernel``, one program per (tile of output pixels, block-row r), walking r's stored
  blocks; the x tile is the input shifted by the block's tap (zero outside the image).
* dX ``dx[(n,ih,iw), ci-block cb] += dy[(n,oh,ow), co-block] @ block`` with
  ``oh = (ih + p - kh*d) / s`` whole and in range (the load mask): the gather form, one program
  per (tile of input pixels, channel block), walking every stored block of channel block ``cb``
  over all taps in one pipelined loop (the layout lists them per ``cb``). Every dx element is
  written once (no atomics).
* dW ``block p = dy[:, co-block]^T @ x_shift[:, ci-block]`` over all N*OH*OW output pixels,
  split over a second grid axis into fp32 partials (deterministic) that
  ``_block_kernels.bsr_dw_reduce_kernel`` sums; pruned blocks get no program.

Without triton this module still imports (``sparsekern.ops._triton``'s stand-ins); a launch
raises ``TritonUnavailable``.
"""

from __future__ import annotations

import torch

from sparsekern.ops._block_kernels import (
    block_keep,
    block_origin,
    bsr_dw_reduce_kernel,
    dw_splits,
    m_bucket,
    store_block,
)
from sparsekern.ops._conv import conv_out_size
from sparsekern.ops._launch import KERNEL_DTYPES, dot_precision, interpreter_upcast, out_tensor
from sparsekern.ops._tiles import batch_tile_configs
from sparsekern.ops._triton import require_triton, tl, triton
from sparsekern.ops.block_sparse_conv2d.layout import ConvLayout, _cdiv

__all__ = ["bsc_dw_launch", "bsc_dx_launch", "bsc_fwd_launch", "config_fits", "nhwc"]


# (BLOCK_M, num_warps, num_stages); BLOCK_M: output pixels per program (forward), input pixels
# (dX), or reduction pixels per step (dW).
_GPU_CONFIGS = {
    "fwd": [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (64, 4, 4), (64, 8, 3)],
    "dx": [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (64, 4, 4), (64, 8, 3)],
    "dw": [(64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4), (64, 8, 3)],
}
_KEY = ["M_BUCKET", "C_out", "C_in", "BM", "BK", "KH", "KW"]
_SMEM_BUDGET = 200 * 1024


def _configs(kind: str) -> list:
    return batch_tile_configs(_GPU_CONFIGS[kind])


def config_fits(block_m: int, warps: int, stages: int, bm: int, bk: int, esize: int) -> bool:
    """Whether a config can run without spilling: its tiles fit the shared memory budget, and the
    fp32 accumulator takes at most 64 registers per thread. The implicit GEMM's per-row pixel
    arithmetic needs the rest: the compile check saw 94-127 STL per thread at
    BLOCK_M x bm = 128 x 128 on 4 warps (128 accumulators each) and 5-9 STL at 64 x 128 on 4
    warps, none on 8 warps."""
    smem = (block_m * max(bm, bk) + bm * bk) * esize * stages
    acc_per_thread = block_m * max(bm, bk) // (32 * warps)
    return smem <= _SMEM_BUDGET and acc_per_thread <= 64 and not (max(bm, bk) >= 128 and warps < 8)


def _prune(configs, named_args, **kwargs):
    """Drop configs that cannot fit (``config_fits``); keep at least one."""
    bm, bk = kwargs.get("BM", 32), kwargs.get("BK", 32)
    first = next(iter(named_args.values()), None)
    esize = first.element_size() if isinstance(first, torch.Tensor) else 2
    kept = [
        c for c in configs
        if config_fits(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages, bm, bk, esize)
    ]  # fmt: skip
    return kept or configs[-1:]


def _conv_precision(dtype: torch.dtype) -> str:
    # fp32 uses TF32 exactly when F.conv2d would: cuDNN follows torch.backends.cudnn.allow_tf32
    # (True by default, unlike cuBLAS's matmul flag).
    return dot_precision(dtype, torch.backends.cudnn.allow_tf32)


# ---------------------------------------------------------------------------------------------
# Kernels. Activations NHWC (strides passed; the channel stride is 1 and becomes a constexpr).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _pixels(offs, OH, OW):
    """Row index of an NHWC GEMM -> (n, oh, ow)."""
    ow = offs % OW
    t = offs // OW
    return t // OH, t % OH, ow


@triton.autotune(configs=_configs("fwd"), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bsc_fwd_kernel(
    x_ptr, w_ptr, row_ptr_ptr, col_idx_ptr, bias_ptr, y_ptr,
    M, C_out, C_in, H, W, OH, OW, KH, KW, CB, NUM_BLOCK_ROWS, W_ROW, M_BUCKET,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_h, sx_w, sx_c,
    sy_n, sy_h, sy_w, sy_c,
    DENSE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """y[n, oh, ow, co] over output-pixel rows (n, oh, ow) x the bm channels of block-row r."""
    pid = tl.program_id(0)
    r = pid % NUM_BLOCK_ROWS
    pid_m = pid // NUM_BLOCK_ROWS
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m < M
    n, oh, ow = _pixels(offs_m, OH, OW)
    offs_i = tl.arange(0, BM)
    offs_j = tl.arange(0, BK)
    co = r * BM + offs_i
    co_ok = co < C_out
    w_row = W_ROW if DENSE else BK
    start = tl.load(row_ptr_ptr + r)
    end = tl.load(row_ptr_ptr + r + 1)
    acc = tl.zeros((BLOCK_M, BM), dtype=tl.float32)
    for p in range(start, end):
        c = tl.load(col_idx_ptr + p)
        tap = c // CB
        ci = tl.multiple_of((c % CB) * BK, BK) + offs_j
        ci_ok = ci < C_in
        ih = oh * stride_h - pad_h + (tap // KW) * dil_h
        iw = ow * stride_w - pad_w + (tap % KW) * dil_w
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        row = n * sx_n + ih * sx_h + iw * sx_w
        a = tl.load(
            x_ptr + row[:, None] + ci[None, :].to(tl.int64) * sx_c,
            mask=pix_ok[:, None] & ci_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BK]
        origin = block_origin(p, r, c, CB, W_ROW, C_in, DENSE, BM, BK)
        w = tl.load(
            w_ptr + origin + offs_i[:, None] * w_row + offs_j[None, :],
            mask=co_ok[:, None] & ci_ok[None, :],
            other=0.0,
        )  # [BM, BK]
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    yrow = n * sy_n + oh * sy_h + ow * sy_w
    y_ptrs = y_ptr + yrow[:, None] + co[None, :].to(tl.int64) * sy_c
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])


@triton.autotune(configs=_configs("dx"), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bsc_dx_kernel(
    dy_ptr, w_ptr, dx_ptr_ptr, dx_row_ptr, dx_perm_ptr, dx_tap_ptr, dx_out_ptr,
    M, C_out, C_in, H, W, OH, OW, KH, KW, CB, W_ROW, M_BUCKET,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdy_n, sdy_h, sdy_w, sdy_c,
    sdx_n, sdx_h, sdx_w, sdx_c,
    DENSE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dx[n, ih, iw, ci] over input-pixel rows (n, ih, iw) x the bk channels of channel block cb:
    the sum over every stored block of cb (all taps) of dy at the pixel that tap reads from."""
    pid = tl.program_id(0)
    cb = pid % CB
    pid_m = pid // CB
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m < M
    n, ih, iw = _pixels(offs_m, H, W)
    offs_i = tl.arange(0, BM)
    offs_j = tl.arange(0, BK)
    ci = cb * BK + offs_j
    ci_ok = ci < C_in
    w_row = W_ROW if DENSE else BK
    start = tl.load(dx_ptr_ptr + cb)
    end = tl.load(dx_ptr_ptr + cb + 1)
    acc = tl.zeros((BLOCK_M, BK), dtype=tl.float32)
    for q in range(start, end):
        r = tl.load(dx_row_ptr + q)
        p = tl.load(dx_perm_ptr + q)
        tap = tl.load(dx_tap_ptr + q)
        oh_num = ih + pad_h - (tap // KW) * dil_h
        ow_num = iw + pad_w - (tap % KW) * dil_w
        oh = oh_num // stride_h
        ow = ow_num // stride_w
        ok = m_ok & (oh_num >= 0) & (ow_num >= 0) & (oh * stride_h == oh_num)
        ok = ok & (ow * stride_w == ow_num) & (oh < OH) & (ow < OW)
        co = tl.multiple_of(r * BM, BM) + offs_i
        co_ok = co < C_out
        row = n * sdy_n + oh * sdy_h + ow * sdy_w
        a = tl.load(
            dy_ptr + row[:, None] + co[None, :].to(tl.int64) * sdy_c,
            mask=ok[:, None] & co_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BM]
        origin = block_origin(p, r, tap * CB + cb, CB, W_ROW, C_in, DENSE, BM, BK)
        w = tl.load(
            w_ptr + origin + offs_i[:, None] * w_row + offs_j[None, :],
            mask=co_ok[:, None] & ci_ok[None, :],
            other=0.0,
        )  # [BM, BK]
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    xrow = n * sdx_n + ih * sdx_h + iw * sdx_w
    dx_ptrs = dx_out_ptr + xrow[:, None] + ci[None, :].to(tl.int64) * sdx_c
    tl.store(dx_ptrs, acc.to(dx_out_ptr.dtype.element_ty), mask=m_ok[:, None] & ci_ok[None, :])


@triton.autotune(
    configs=_configs("dw"), key=_KEY + ["SPLITS"],
    prune_configs_by={"early_config_prune": _prune},
)  # fmt: skip
@triton.jit
def _bsc_dw_kernel(
    dy_ptr, x_ptr, block_row_ptr, col_idx_ptr, keep_ptr, dw_ptr, part_ptr,
    M, C_out, C_in, H, W, OH, OW, KH, KW, CB, CHUNK, NNZ, SPLITS, W_ROW, M_BUCKET,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdy_n, sdy_h, sdy_w, sdy_c,
    sx_n, sx_h, sx_w, sx_c,
    DENSE: tl.constexpr, SPLIT: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """part[s, p] (or block p in place) = sum over output pixels [s*CHUNK, (s+1)*CHUNK) of
    dy[:, co-block]^T x_shift[:, ci-block]."""
    p = tl.program_id(0)
    s = tl.program_id(1)
    r = tl.load(block_row_ptr + p)
    c = tl.load(col_idx_ptr + p)
    tap = c // CB
    kh_off = (tap // KW) * dil_h - pad_h
    kw_off = (tap % KW) * dil_w - pad_w
    offs_i = tl.arange(0, BM)
    offs_j = tl.arange(0, BK)
    co = tl.multiple_of(r * BM, BM) + offs_i
    ci = tl.multiple_of((c % CB) * BK, BK) + offs_j
    co_ok = co < C_out
    ci_ok = ci < C_in
    m_start = s.to(tl.int64) * CHUNK
    m_end = tl.minimum(m_start + CHUNK, M)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for m0 in range(0, tl.cdiv(m_end - m_start, BLOCK_M)):
        offs_m = m_start + m0 * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        m_ok = offs_m < m_end
        n, oh, ow = _pixels(offs_m, OH, OW)
        ih = oh * stride_h + kh_off
        iw = ow * stride_w + kw_off
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        drow = n * sdy_n + oh * sdy_h + ow * sdy_w
        xrow = n * sx_n + ih * sx_h + iw * sx_w
        a = tl.load(
            dy_ptr + drow[None, :] + co[:, None].to(tl.int64) * sdy_c,
            mask=co_ok[:, None] & m_ok[None, :],
            other=0.0,
        )  # [BM, BLOCK_M]
        b = tl.load(
            x_ptr + xrow[:, None] + ci[None, :].to(tl.int64) * sx_c,
            mask=pix_ok[:, None] & ci_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BK]
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if SPLIT:
        base = (s.to(tl.int64) * NNZ + p) * (BM * BK)
        tl.store(part_ptr + base + offs_i[:, None] * BK + offs_j[None, :], acc)
    else:
        origin = block_origin(p, r, c, CB, W_ROW, C_in, DENSE, BM, BK)
        w_row = W_ROW if DENSE else BK
        store_block(dw_ptr, keep_ptr, origin, w_row, co_ok[:, None] & ci_ok[None, :], acc,
                    MASKED, BM, BK)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launchers: check, allocate, launch. 4-D tensors in NCHW logical order, channels_last storage
# (``nhwc`` converts); ``out`` lets tests poison the output. geometry: ((sh, sw), (ph, pw),
# (dh, dw)).
# ---------------------------------------------------------------------------------------------
def nhwc(t: torch.Tensor) -> torch.Tensor:
    """``t`` (4-D) in channels_last storage (itself when it already is)."""
    return (
        t
        if t.is_contiguous(memory_format=torch.channels_last)
        else t.contiguous(memory_format=torch.channels_last)
    )


def _strides_nhwc(t: torch.Tensor) -> tuple[int, int, int, int]:
    sn, sc, sh, sw = t.stride()
    return sn, sh, sw, sc


def _check(name, lay: ConvLayout, w: torch.Tensor, **acts) -> None:
    require_triton(name)
    if w.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: kernels take float16, bfloat16 or float32, got {w.dtype}")
    dense_ok = w.is_contiguous(memory_format=torch.channels_last) if w.dim() == 4 else False
    if lay.base.dense and not dense_ok:
        raise ValueError(f"{name}: expected a channels_last weight, got strides {w.stride()}")
    if not lay.base.dense and not w.is_contiguous():
        raise ValueError(f"{name}: expected contiguous values, got strides {w.stride()}")
    for k, t in acts.items():
        if t.dim() != 4:
            raise ValueError(f"{name}: expected {k} 4-D [N, C, H, W], got {list(t.shape)}")
        if t.dtype != w.dtype or t.device != w.device:
            raise TypeError(
                f"{name}: expected {k} as {w.dtype} on {w.device}, got {t.dtype} on {t.device}"
            )
        if t.stride(1) != 1 and t.shape[1] > 1:
            raise ValueError(f"{name}: expected {k} channels_last, got strides {t.stride()}")


def _geom(geometry):
    (sh, sw), (ph, pw), (dh, dw) = geometry
    return sh, sw, ph, pw, dh, dw


def _nchw_empty(shape, like) -> torch.Tensor:
    return torch.empty(shape, device=like.device, dtype=like.dtype).contiguous(
        memory_format=torch.channels_last
    )


def bsc_fwd_launch(x, w, lay: ConvLayout, bias, geometry, out=None) -> torch.Tensor:
    """``y [N, C_out, OH, OW]`` (channels_last) from ``x [N, C_in, H, W]`` (channels_last) and
    the stored blocks of ``w``."""
    _check("block_sparse_conv2d forward", lay, w, x=x)
    B, _, H, W = x.shape
    c_out, c_in, KH, KW = lay.base.shape
    sh, sw, ph, pw, dh, dw = _geom(geometry)
    OH, OW = conv_out_size(H, KH, sh, ph, dh), conv_out_size(W, KW, sw, pw, dw)
    y = _nchw_empty((B, c_out, OH, OW), x) if out is None else out
    out_tensor(y, (B, c_out, OH, OW), x, x.dtype)
    M = B * OH * OW
    if M == 0:
        return y
    bm, bk = lay.base.block
    R, CB = _cdiv(c_out, bm), _cdiv(c_in, bk)
    grid = lambda meta: (R * triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _bsc_fwd_kernel[grid](
        x, w, lay.base.row_ptr, lay.base.col_idx, bias if bias is not None else x, y,
        M, c_out, c_in, H, W, OH, OW, KH, KW, CB, R, KH * KW * c_in, m_bucket(M),
        sh, sw, ph, pw, dh, dw,
        *_strides_nhwc(x), *_strides_nhwc(y),
        DENSE=lay.base.dense, HAS_BIAS=bias is not None, UPCAST=interpreter_upcast(x.dtype),
        PRECISION=_conv_precision(x.dtype), BM=bm, BK=bk,
    )  # fmt: skip
    return y


def bsc_dx_launch(dy, w, lay: ConvLayout, x_shape, geometry, out=None) -> torch.Tensor:
    """``dx [N, C_in, H, W]`` (channels_last) from ``dy [N, C_out, OH, OW]`` (channels_last) and
    the stored blocks of ``w``."""
    _check("block_sparse_conv2d dx", lay, w, dy=dy)
    c_out, c_in, KH, KW = lay.base.shape
    B, _, H, W = x_shape
    OH, OW = dy.shape[2], dy.shape[3]
    dx = _nchw_empty((B, c_in, H, W), dy) if out is None else out
    out_tensor(dx, (B, c_in, H, W), dy, dy.dtype)
    M = B * H * W
    if M == 0:
        return dx
    bm, bk = lay.base.block
    CB = _cdiv(c_in, bk)
    sh, sw, ph, pw, dh, dw = _geom(geometry)
    grid = lambda meta: (CB * triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _bsc_dx_kernel[grid](
        dy, w, lay.dx_ptr, lay.dx_row, lay.dx_perm, lay.dx_tap, dx,
        M, c_out, c_in, H, W, OH, OW, KH, KW, CB, KH * KW * c_in, m_bucket(M),
        sh, sw, ph, pw, dh, dw,
        *_strides_nhwc(dy), *_strides_nhwc(dx),
        DENSE=lay.base.dense, UPCAST=interpreter_upcast(dy.dtype),
        PRECISION=_conv_precision(dy.dtype), BM=bm, BK=bk,
    )  # fmt: skip
    return dx


def bsc_dw_launch(dy, x, w, lay: ConvLayout, geometry, out=None) -> torch.Tensor:
    """Gradient of the storage ``w`` (dense: channels_last like ``w``; compact: ``[nnz, bm, bk]``)
    at stored blocks (masked inside a block if the layout says so); 0 elsewhere. ``out`` is
    written only at stored blocks."""
    _check("block_sparse_conv2d dweight", lay, w, dy=dy, x=x)
    c_out, c_in, KH, KW = lay.base.shape
    B, _, H, W = x.shape
    OH, OW = dy.shape[2], dy.shape[3]
    fmt = torch.channels_last if lay.base.dense else torch.contiguous_format
    dwt = torch.zeros_like(w, memory_format=fmt) if out is None else out
    out_tensor(dwt, tuple(w.shape), w, w.dtype)
    if lay.base.nnz == 0:
        return dwt
    bm, bk = lay.base.block
    CB = _cdiv(c_in, bk)
    M = B * OH * OW
    S = dw_splits(lay.base.nnz, M)
    chunk = _cdiv(M, S)
    keep, masked = block_keep(lay.base)
    part = dwt
    if S > 1:
        part = torch.empty((S, lay.base.nnz, bm, bk), device=w.device, dtype=torch.float32)
    sh, sw, ph, pw, dh, dw = _geom(geometry)
    w_row = KH * KW * c_in
    _bsc_dw_kernel[(lay.base.nnz, S)](
        dy, x, lay.base.block_row, lay.base.col_idx, keep, dwt, part,
        M, c_out, c_in, H, W, OH, OW, KH, KW, CB, chunk, lay.base.nnz, S, w_row, m_bucket(M),
        sh, sw, ph, pw, dh, dw,
        *_strides_nhwc(dy), *_strides_nhwc(x),
        DENSE=lay.base.dense, SPLIT=S > 1, MASKED=masked, UPCAST=interpreter_upcast(x.dtype),
        PRECISION=_conv_precision(x.dtype), BM=bm, BK=bk,
    )  # fmt: skip
    if S > 1:
        bsr_dw_reduce_kernel[(lay.base.nnz,)](
            part, lay.base.block_row, lay.base.col_idx, keep, dwt,
            c_out, c_in, CB, lay.base.nnz, S, w_row, c_in,
            DENSE=lay.base.dense, MASKED=masked, BM=bm, BK=bk,
        )  # fmt: skip
    return dwt
