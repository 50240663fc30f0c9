"""Block-sparse 2-D convolution: implicit-GEMM Triton kernels on channels_last (NHWC) activations
that visit only the kept blocks of the weight, in the forward, dX and dW (groups=1).

The weight's GEMM view is TAP-MAJOR: ``W [C_out, C_in, kH, kW]`` is seen as the matrix
``[C_out, kH*kW*C_in_pad]`` with columns ordered (kh, kw, ci) and ``C_in`` padded to a multiple of
``bk`` per tap, so every ``bm x bk`` block holds ``bm`` output channels x ``bk`` input channels of
ONE kernel tap (kh, kw). Why not PyTorch's (ci, kh, kw) order: there a block straddles taps, so
its activation operand would need a different spatial shift per column, which no tile-level
``tl.dot`` can express.

Why NHWC: a block's ``bk`` input channels at one pixel are then ``bk`` consecutive elements, so
every activation load is a 16-byte vector per row, pipelined by ``cp.async``; the pixel (row)
address is computed once per tile row. The NCHW kernels this file held before gathered with
scalar 2-byte loads and spilled up to 4.4 KB per thread. Inputs in NCHW are converted once per
call (one read and one write of x: at VGG-16 conv3_2, batch 64, bf16, 103 MB, ~48 us at
4.3 TB/s against a ~0.1 ms block-sparse forward at d=0.1); keep the model channels_last
(``model.to(memory_format=torch.channels_last)``) to skip it. Outputs and dx are channels_last.

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

Storages, as in ``block_sparse_linear``: a dense weight with a block-structured bool mask
(``block_masked_conv2d``: SparseConv2d's block mode; the kernels read it as channels_last
``[C_out, kH, kW, C_in]``, where a tap-major block is ``bk`` consecutive elements per row; a
weight in another layout is copied once per call) or compact ``values [nnz, bm, bk]`` of a
:class:`BlockSparseMatrix` of the tap-major view (``block_sparse_conv2d``: inference, memory falls
with density).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sparsekern.formats.block_sparse import BlockSparseMatrix, block_size_pair
from sparsekern.ops._block_kernels import (
    Layout,
    block_keep,
    block_origin,
    bsr_dw_reduce_kernel,
    dw_splits,
    layout_from_occupancy,
    m_bucket,
    store_block,
)
from sparsekern.ops._checks import check_bias
from sparsekern.ops._conv import conv_out_size, conv_pair
from sparsekern.ops._dispatch import use_kernels
from sparsekern.ops._launch import (
    KERNEL_DTYPES,
    autocast_to,
    dot_precision,
    interpreter_upcast,
    out_tensor,
    twin_vjp,
)
from sparsekern.ops._mask_cache import cached_on_mask, masked_copy
from sparsekern.ops._mask_pass import zero_pruned
from sparsekern.ops._tiles import batch_tile_configs
from sparsekern.ops._triton import require_triton, tl, triton
from sparsekern.ops.masked_conv2d import masked_conv2d

__all__ = [
    "block_masked_conv2d",
    "block_sparse_conv2d",
    "block_sparse_conv2d_reference",
    "bsc_dw_launch",
    "bsc_dx_launch",
    "bsc_fwd_launch",
    "compile_specs",
    "conv_block_occupancy",
    "conv_layout_of_mask",
    "conv_layout_of_matrix",
    "conv_weight_from_gemm",
    "conv_weight_to_gemm",
]

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


class ConvLayout(NamedTuple):
    """A :class:`Layout` of the tap-major view plus what the gather-form dX walks: per channel
    block ``cb``, its stored blocks over all taps, ``dx_ptr [CB + 1]``, ``dx_row [nnz]`` (block
    row), ``dx_perm [nnz]`` (index of the stored block), ``dx_tap [nnz]``."""

    base: Layout
    dx_ptr: torch.Tensor
    dx_row: torch.Tensor
    dx_perm: torch.Tensor
    dx_tap: torch.Tensor


def _with_dx_lists(base: Layout, kh: int, kw: int, CB: int) -> ConvLayout:
    c_of = base.col_idx.long()
    cb_of, tap_of = c_of % CB, c_of // CB
    order = torch.argsort(cb_of * (kh * kw) + tap_of, stable=True)  # by cb, then tap, then row
    counts = torch.bincount(cb_of, minlength=CB)
    dx_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    i32 = torch.int32
    return ConvLayout(
        base, dx_ptr, base.block_row[order].to(i32), order.to(i32), tap_of[order].to(i32)
    )


def _compute_conv_mask_layout(mask: torch.Tensor, block) -> ConvLayout:
    bm, bk = block
    c_out, c_in, kh, kw = mask.shape
    occ = conv_block_occupancy(mask, block)
    full = conv_block_occupancy(~mask, block).logical_not()
    # A block partly outside the matrix (ragged C_out / C_in) counts as full when all its
    # in-bounds weights are kept: the padding is never loaded.
    whole = bool((full | ~occ).all())
    keep = None
    if not whole:  # dW's epilogue reads it at the weight's (channels_last) offsets
        keep = mask.contiguous(memory_format=torch.channels_last).view(torch.uint8)
    base = layout_from_occupancy(occ, mask.shape, block, True, keep)
    return _with_dx_lists(base, kh, kw, _cdiv(c_in, bk))


def conv_layout_of_mask(mask: torch.Tensor, block_size) -> ConvLayout:
    """Layout of a dense conv weight whose kept blocks (tap-major view) are those of ``mask``
    holding any True. Cached on the mask; recomputed when it changes in place."""
    block = block_size_pair(block_size)
    return cached_on_mask(mask, f"bsc:{block}", lambda m: _compute_conv_mask_layout(m, block))


def conv_layout_of_matrix(w: BlockSparseMatrix, weight_shape) -> ConvLayout:
    """Layout of compact values: ``w`` is the BlockSparseMatrix of the tap-major view."""
    c_out, c_in, kh, kw = weight_shape
    base = Layout(
        tuple(weight_shape), w.block_size, w.nnz_blocks, w.row_ptr, w.col_idx, w.block_row,
        w.col_ptr, w.t_row, w.t_perm, False, None,
    )  # fmt: skip
    return _with_dx_lists(base, kh, kw, _cdiv(c_in, w.block_size[1]))


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


# ---------------------------------------------------------------------------------------------
# Implementations, one per (storage, GEMM), shared by eager mode and the custom ops. geometry: the
# six ints (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w). Storage "masked": a dense
# channels_last weight and its bool mask (layout cached on the mask); "compact": values with the
# matrix's ten metadata tensors (ConvLayout order).
# ---------------------------------------------------------------------------------------------
def _geom6(geometry) -> tuple:
    g = [int(v) for v in geometry]
    return (g[0], g[1]), (g[2], g[3]), (g[4], g[5])


def _compact_conv_layout(values, meta, weight_shape) -> ConvLayout:
    row_ptr, col_idx, block_row, col_ptr, t_row, t_perm, dx_ptr, dx_row, dx_perm, dx_tap = meta
    base = Layout(
        tuple(weight_shape), (values.shape[1], values.shape[2]), values.shape[0], row_ptr,
        col_idx, block_row, col_ptr, t_row, t_perm, False, None,
    )  # fmt: skip
    return ConvLayout(base, dx_ptr, dx_row, dx_perm, dx_tap)


def _conv_meta(lay: ConvLayout) -> list[torch.Tensor]:
    b = lay.base
    return [b.row_ptr, b.col_idx, b.block_row, b.col_ptr, b.t_row, b.t_perm, *lay[1:]]


def _masked_fwd(x, w, mask, bias, geometry, bm: int, bk: int):
    return bsc_fwd_launch(x, w, conv_layout_of_mask(mask, (bm, bk)), bias, _geom6(geometry))


def _masked_dx(dy, w, mask, x_shape, geometry, bm: int, bk: int):
    lay = conv_layout_of_mask(mask, (bm, bk))
    return bsc_dx_launch(dy, w, lay, tuple(x_shape), _geom6(geometry))


def _masked_dw(dy, x, w, mask, geometry, bm: int, bk: int):
    return bsc_dw_launch(dy, x, w, conv_layout_of_mask(mask, (bm, bk)), _geom6(geometry))


def _compact_fwd(x, values, meta, bias, weight_shape, geometry):
    lay = _compact_conv_layout(values, meta, weight_shape)
    return bsc_fwd_launch(x, values, lay, bias, _geom6(geometry))


def _compact_dx(dy, values, meta, x_shape, weight_shape, geometry):
    lay = _compact_conv_layout(values, meta, weight_shape)
    return bsc_dx_launch(dy, values, lay, tuple(x_shape), _geom6(geometry))


def _compact_dw(dy, x, values, meta, weight_shape, geometry):
    lay = _compact_conv_layout(values, meta, weight_shape)
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


def _fake_nhwc(shape, like) -> torch.Tensor:
    return like.new_empty(shape).contiguous(memory_format=torch.channels_last)


# torch.library custom ops: opaque to torch.compile, so a compiled model runs the same kernels.
@torch.library.custom_op("sparsekern::block_masked_conv2d_fwd", mutates_args=())
def _masked_fwd_op(
    x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
    geometry: list[int], bm: int, bk: int,
) -> torch.Tensor:  # fmt: skip
    return _masked_fwd(x, w, mask, bias, geometry, bm, bk)


@_masked_fwd_op.register_fake
def _(x, w, mask, bias, geometry, bm, bk):
    return _fake_nhwc((x.shape[0], w.shape[0], *_out_hw(x.shape, w.shape, geometry)), x)


@torch.library.custom_op("sparsekern::block_masked_conv2d_dx", mutates_args=())
def _masked_dx_op(
    dy: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, x_shape: list[int],
    geometry: list[int], bm: int, bk: int,
) -> torch.Tensor:  # fmt: skip
    return _masked_dx(dy, w, mask, x_shape, geometry, bm, bk)


@_masked_dx_op.register_fake
def _(dy, w, mask, x_shape, geometry, bm, bk):
    return _fake_nhwc(tuple(x_shape), dy)


@torch.library.custom_op("sparsekern::block_masked_conv2d_dw", mutates_args=())
def _masked_dw_op(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor,
    geometry: list[int], bm: int, bk: int,
) -> torch.Tensor:  # fmt: skip
    return _masked_dw(dy, x, w, mask, geometry, bm, bk)


@_masked_dw_op.register_fake
def _(dy, x, w, mask, geometry, bm, bk):
    return torch.empty_like(w, memory_format=torch.channels_last)


@torch.library.custom_op("sparsekern::block_sparse_conv2d_fwd", mutates_args=())
def _compact_fwd_op(
    x: torch.Tensor, values: torch.Tensor, meta: list[torch.Tensor], bias: torch.Tensor | None,
    weight_shape: list[int], geometry: list[int],
) -> torch.Tensor:  # fmt: skip
    return _compact_fwd(x, values, meta, bias, weight_shape, geometry)


@_compact_fwd_op.register_fake
def _(x, values, meta, bias, weight_shape, geometry):
    shape = (x.shape[0], weight_shape[0], *_out_hw(x.shape, weight_shape, geometry))
    return _fake_nhwc(shape, x)


@torch.library.custom_op("sparsekern::block_sparse_conv2d_dx", mutates_args=())
def _compact_dx_op(
    dy: torch.Tensor, values: torch.Tensor, meta: list[torch.Tensor], x_shape: list[int],
    weight_shape: list[int], geometry: list[int],
) -> torch.Tensor:  # fmt: skip
    return _compact_dx(dy, values, meta, x_shape, weight_shape, geometry)


@_compact_dx_op.register_fake
def _(dy, values, meta, x_shape, weight_shape, geometry):
    return _fake_nhwc(tuple(x_shape), dy)


@torch.library.custom_op("sparsekern::block_sparse_conv2d_dw", mutates_args=())
def _compact_dw_op(
    dy: torch.Tensor, x: torch.Tensor, values: torch.Tensor, meta: list[torch.Tensor],
    weight_shape: list[int], geometry: list[int],
) -> torch.Tensor:  # fmt: skip
    return _compact_dw(dy, x, values, meta, weight_shape, geometry)


@_compact_dw_op.register_fake
def _(dy, x, values, meta, weight_shape, geometry):
    return torch.empty_like(values, memory_format=torch.contiguous_format)


def _run(kind: str, gemm: str, *args):
    """One GEMM through its custom op under torch.compile, else the implementation directly."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.sparsekern, f"{_OP_NAMES[kind]}_{gemm}")(*args)
    return _IMPLS[kind, gemm](*args)


class _BlockSparseConvFunction(torch.autograd.Function):
    """Autograd over the storage tensor ``w`` (a channels_last dense weight, or compact values).
    ``kind`` "masked": ``meta`` = (mask,), ``dims`` = (bm, bk); "compact": ``meta`` = the ten
    ConvLayout tensors, ``dims`` = weight_shape. Activations go in and come out channels_last."""

    @staticmethod
    def forward(ctx, x, w, bias, kind, dims, geometry, *meta):
        x = nhwc(x)
        geo = [v for pair in geometry for v in pair]
        if kind == "masked":
            y = _run(kind, "fwd", x, w, meta[0], bias, geo, *dims)
        else:
            y = _run(kind, "fwd", x, w, list(meta), bias, list(dims), geo)
        ctx.save_for_backward(x, w, *meta)
        ctx.kind, ctx.dims, ctx.geo, ctx.has_bias = kind, dims, geo, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, *meta = ctx.saved_tensors
        dy = nhwc(dy)
        kind, dims, geo = ctx.kind, ctx.dims, ctx.geo
        if torch.is_grad_enabled():
            # create_graph=True: the kernels' backward is not differentiable
            if kind != "masked":
                raise RuntimeError(
                    "block_sparse_conv2d: expected first-order gradients only (the compact conv "
                    "kernels' backward is not differentiable), got create_graph=True; use "
                    "block_masked_conv2d (SparseConv2d block mode) or "
                    "block_sparse_conv2d_reference for second-order gradients"
                )
            stride, padding, dilation = geo[0:2], geo[2:4], geo[4:6]
            dx, dw = twin_vjp(
                lambda x, w: F.conv2d(x, torch.where(meta[0], w, 0), None, stride, padding,
                                      dilation),
                (x, w), ctx.needs_input_grad[:2], dy,
            )  # fmt: skip
            db = dy.sum(dim=(0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
            return (dx, dw, db, None, None, None) + (None,) * len(meta)
        dx = dw = db = None
        if kind == "masked":
            if ctx.needs_input_grad[0]:
                dx = _run(kind, "dx", dy, w, meta[0], list(x.shape), geo, *dims)
            if ctx.needs_input_grad[1]:
                dw = _run(kind, "dw", dy, x, w, meta[0], geo, *dims)
        else:
            if ctx.needs_input_grad[0]:
                dx = _run(kind, "dx", dy, w, list(meta), list(x.shape), list(dims), geo)
            if ctx.needs_input_grad[1]:
                dw = _run(kind, "dw", dy, x, w, list(meta), list(dims), geo)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(dim=(0, 2, 3))
        return (dx, dw, db, None, None, None) + (None,) * len(meta)


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------
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
        raise ValueError(f"{who}: expected x as a floating-point [N, C_in, H, W] tensor, got {got}")
    if x.shape[1] != c_in:
        raise ValueError(f"{who}: expected x with C_in={c_in} channels, got shape {list(x.shape)}")
    if x.dtype != w.dtype or x.device != w.device:
        raise TypeError(
            f"{who}: expected x as {w.dtype} on {w.device} like the weight, got {x.dtype} on "
            f"{x.device}"
        )
    check_bias(who, bias, c_out, x)
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
    """``F.conv2d(x, weight * mask, bias, stride, padding, dilation)`` (groups=1, symmetric zero
    padding) on a dense weight, the kernels skipping every all-False block of ``mask``'s tap-major
    view (``bm`` output x ``bk`` input channels of one tap). ``dweight`` is exactly 0 where
    ``mask`` is False and never written at pruned blocks; pruned entries are ignored (NaN
    included). The result is channels_last. Where the Triton kernels do not run:
    :func:`sparsekern.ops.masked_conv2d` (``assume_pruned_zero`` passed on)."""
    block = block_size_pair(block_size)
    geometry = _geometry_of(stride, padding, dilation)
    x, weight, bias = autocast_to(x, weight, bias)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"block_masked_conv2d: expected weight [C_out, C_in, kH, kW], got {got}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
        got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else mask
        raise ValueError(
            f"block_masked_conv2d: expected a torch.bool mask of the weight's shape "
            f"{list(weight.shape)}, got {got}"
        )
    if mask.device != weight.device:
        raise ValueError(
            f"block_masked_conv2d: expected mask on the weight's device {weight.device}, got "
            f"{mask.device}"
        )
    c_out, c_in, kh, kw = weight.shape
    _check_x("block_masked_conv2d", x, c_in, weight, bias, c_out, geometry, (kh, kw))
    if not (use_kernels(x) and x.dtype in KERNEL_DTYPES):
        return masked_conv2d(
            x, weight, mask, bias, *geometry, assume_pruned_zero=assume_pruned_zero
        )
    require_triton("block_masked_conv2d on this device")
    if not assume_pruned_zero and conv_layout_of_mask(mask, block).base.keep is not None:
        # Holes inside kept blocks: the kernels read blocks as they are, so they run on the
        # masked weight (its gradient is masked by autograd's where)
        masked = torch.is_grad_enabled() and weight.requires_grad
        weight = zero_pruned(weight, mask) if masked else masked_copy(weight, mask)
    weight = nhwc(weight)  # the kernels' storage; the gradient flows back through the copy
    bias = None if bias is None else bias.contiguous()
    # channels_last made here, not inside the Function: what it saves is then its own input,
    # whose autograd history a second derivative (twin_vjp) needs
    return _BlockSparseConvFunction.apply(nhwc(x), weight, bias, "masked", block, geometry, mask)


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
        x: ``[N, C_in, H, W]`` (channels_last is read as it is; NCHW is converted once).
        weight: the :class:`BlockSparseMatrix` of the tap-major view ``[C_out, kH*kW*C_in_pad]``
            (``BlockSparseMatrix.from_dense(conv_weight_to_gemm(w, bk), (bm, bk))``).
        weight_shape: ``(C_out, C_in, kH, kW)``.
    Returns:
        ``[N, C_out, OH, OW]`` (channels_last on the kernels); gradients to ``x``,
        ``weight.values`` (stored blocks) and ``bias``.
    """
    if not isinstance(weight, BlockSparseMatrix):
        raise TypeError(
            f"block_sparse_conv2d: expected a BlockSparseMatrix, got {type(weight).__name__}"
        )
    try:
        c_out, c_in, kh, kw = (int(s) for s in weight_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"block_sparse_conv2d: expected weight_shape (C_out, C_in, kH, kW), got "
            f"{weight_shape!r}"
        ) from None
    bm, bk = weight.block_size
    want = (c_out, kh * kw * _cdiv(c_in, bk) * bk)
    if weight.shape != want:
        raise ValueError(
            f"block_sparse_conv2d: expected the tap-major view of shape {want} for weight_shape "
            f"{tuple(weight_shape)} at bk={bk}, got {weight.shape}"
        )
    geometry = _geometry_of(stride, padding, dilation)
    values = weight.values
    x, values, bias = autocast_to(x, values, bias)
    _check_x("block_sparse_conv2d", x, c_in, values, bias, c_out, geometry, (kh, kw))
    if not (use_kernels(x) and x.dtype in KERNEL_DTYPES):
        if values is not weight.values:
            weight = BlockSparseMatrix(
                values, weight.row_ptr, weight.col_idx, weight.shape, weight.block_size,
                validate=False,
            )  # fmt: skip
        return block_sparse_conv2d_reference(x, weight, weight_shape, bias, *geometry)
    require_triton("block_sparse_conv2d on this device")
    lay = getattr(weight, "_conv_layout", None)
    if lay is None or lay.base.row_ptr is not weight.row_ptr or lay.base.shape != (
        c_out, c_in, kh, kw,
    ):  # fmt: skip
        lay = conv_layout_of_matrix(weight, (c_out, c_in, kh, kw))
        weight._conv_layout = lay  # derived metadata, rebuilt when the matrix changes
    values = values if values.is_contiguous() else values.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _BlockSparseConvFunction.apply(
        x, values, bias, "compact", (c_out, c_in, kh, kw), geometry, *_conv_meta(lay)
    )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see sparsekern.ops._compile_check)
# ---------------------------------------------------------------------------------------------
_SPEC_BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (64, 128)]
# The block shapes the GPU targets are set at (blocks >= 64). 32x32 blocks are reported, not
# held: a 32-row dW block is below wgmma's 64-row minimum and runs mma.sync.
HOT_BLOCKS = [(64, 64), (128, 128), (64, 128)]


def _bench_values(bm: int, bk: int) -> dict[str, dict[str, int]]:
    """Integer arguments of each kernel at the benchmark shape: VGG-16 conv3_2 (256 -> 256
    channels, 3x3, pad 1, 56x56) at batch 64, channels_last activations, d = 0.1."""
    n, c, h, w = 64, 256, 56, 56
    R, CB = c // bm, c // bk
    nnz = max(1, (R * CB * 9) // 10)
    dims = {"M": n * h * w, "C_out": c, "C_in": c, "H": h, "W": w, "OH": h, "OW": w,
            "KH": 3, "KW": 3, "CB": CB, "W_ROW": 9 * c, "M_BUCKET": 1 << 18}  # fmt: skip
    geo = {"stride_h": 1, "stride_w": 1, "pad_h": 1, "pad_w": 1, "dil_h": 1, "dil_w": 1}
    act = dict(zip(("n", "h", "w", "c"), (h * w * c, w * c, c, 1)))  # NHWC

    def strides(prefix):
        return {f"{prefix}_{k}": v for k, v in act.items()}

    return {
        "fwd": {**dims, "NUM_BLOCK_ROWS": R, **geo, **strides("sx"), **strides("sy")},
        "dx": {**dims, **geo, **strides("sdy"), **strides("sdx")},
        "dw": {**dims, "CHUNK": n * h * w // 2, "NNZ": nnz, "SPLITS": 2, **geo,
               **strides("sdy"), **strides("sx")},
    }  # fmt: skip


def compile_specs():
    """Yield one spec dict per kernel, storage, block shape, config and dtype (``name``, ``fn``,
    ``signature``, ``constexprs``, ``values`` at VGG-16 conv3_2 batch 64, ``num_warps``,
    ``num_stages``, ``hot``: the bf16 configs at the benchmark's block shapes)."""
    for dt in ("bf16", "fp16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        kernels = {
            "fwd": (
                _bsc_fwd_kernel,
                {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "row_ptr_ptr": "*i32",
                 "col_idx_ptr": "*i32", "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}"},
                {"HAS_BIAS": True},
            ),
            "dx": (
                _bsc_dx_kernel,
                {"dy_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dx_ptr_ptr": "*i32",
                 "dx_row_ptr": "*i32", "dx_perm_ptr": "*i32", "dx_tap_ptr": "*i32",
                 "dx_out_ptr": f"*{dt}"},
                {},
            ),
            "dw": (
                _bsc_dw_kernel,
                {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "block_row_ptr": "*i32",
                 "col_idx_ptr": "*i32", "keep_ptr": "*u8", "dw_ptr": f"*{dt}",
                 "part_ptr": "*fp32"},
                {"SPLIT": True, "MASKED": False},
            ),
        }  # fmt: skip
        for dense in (False, True):
            storage = "dense" if dense else "compact"
            for kind, (kernel, ptrs, extra) in kernels.items():
                for bm, bk in _SPEC_BLOCKS:
                    values = _bench_values(bm, bk)[kind]
                    sig = ptrs | {k: "i32" for k in values}
                    for block_m, w, s in _GPU_CONFIGS[kind]:
                        # The configs the launch-time pruning would drop are not compiled either.
                        if not config_fits(block_m, w, s, bm, bk, 4 if dt == "fp32" else 2):
                            continue
                        consts = {**extra, "DENSE": dense, "UPCAST": False, "PRECISION": prec}
                        consts |= {"BM": bm, "BK": bk, "BLOCK_M": block_m}
                        yield {
                            "name": (
                                f"block_sparse_conv2d.{kind}[{dt},{storage},b{bm}x{bk},"
                                f"m{block_m},w{w},s{s}]"
                            ),
                            "fn": kernel.fn,
                            "signature": sig,
                            "constexprs": consts,
                            "values": values,
                            "num_warps": w,
                            "num_stages": s,
                            "hot": dt == "bf16" and (bm, bk) in HOT_BLOCKS,
                        }
