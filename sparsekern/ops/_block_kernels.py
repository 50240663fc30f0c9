"""Block-sparse kernel code shared by ``block_sparse_linear`` and ``block_sparse_conv2d``: the
layout (which blocks are stored, in both orders), block addresses, the epilogue that stores one
block's gradient, the dW split and the kernel that sums its partials.

Block addresses are arithmetic, never loaded: block ``p`` of the compact storage
(``values [nnz, bm, bk]``) starts at ``p * bm * bk``; block ``(r, c)`` of a dense weight at
``r * bm * W_ROW + tap(c) * TAP + cb(c) * bk`` (linear: ``tap = 0``, ``cb = c``, ``W_ROW = K``;
conv, a channels_last weight ``[C_out, kH, kW, C_in]``: ``tap, cb = divmod(c, CB)``,
``TAP = C_in``, ``W_ROW = kH * kW * C_in``). With unit inner strides and ``tl.multiple_of`` hints
the compiler sees ``bk`` contiguous elements per row, so block loads are 16-byte vectors that the
pipeliner turns into ``cp.async`` a few stages ahead of the wgmma (``warp_group_dot_wait
{pendings = 1}``). Loading the offset from memory instead (what these kernels did before) made
every W load a synchronous scalar 2-byte load and the wgmma wait at every step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sparsekern.ops._dispatch import interpreter_enabled
from sparsekern.ops._triton import tl, triton

__all__ = [
    "Layout",
    "block_keep",
    "block_origin",
    "bsr_dw_reduce_kernel",
    "dw_splits",
    "layout_from_occupancy",
    "m_bucket",
    "store_block",
]


@triton.jit
def block_origin(p, r, c, CB, W_ROW, TAP, DENSE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Element offset (int64) of the first element of stored block ``p`` at block row ``r``,
    block column ``c``: ``p * BM * BK`` (compact) or ``r * BM * W_ROW + (c // CB) * TAP +
    (c % CB) * BK`` (dense)."""
    if DENSE:
        return tl.cast(r * BM, tl.int64) * W_ROW + tl.cast(c // CB, tl.int64) * TAP + (c % CB) * BK
    return tl.cast(p, tl.int64) * (BM * BK)


@triton.jit
def store_block(dw_ptr, keep_ptr, origin, w_row, w_ok, acc, MASKED: tl.constexpr,
                BM: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """Store a block's fp32 gradient ``acc [BM, BK]`` at ``dw[origin + i * w_row + j]`` (inside
    ``w_ok``); with MASKED it is exactly 0 at pruned weights inside the kept block (the mask read
    as bytes at the same offsets: the epilogue, once per block)."""
    off = origin + tl.arange(0, BM)[:, None].to(tl.int64) * w_row + tl.arange(0, BK)[None, :]
    if MASKED:
        keep = tl.load(keep_ptr + off, mask=w_ok, other=0)
        acc = tl.where(keep != 0, acc, tl.zeros_like(acc))
    tl.store(dw_ptr + off, acc.to(dw_ptr.dtype.element_ty), mask=w_ok)


@triton.jit
def bsr_dw_reduce_kernel(
    part_ptr, block_row_ptr, col_idx_ptr, keep_ptr, dw_ptr,
    ROWS, COLS, CB, NNZ, SPLITS, W_ROW, TAP,
    DENSE: tl.constexpr, MASKED: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """dW block p = sum_s part[s, p] (fp32, in a fixed order: deterministic), masked inside the
    block if needed, stored in place. Block column c covers columns ``(c % CB) * BK + j < COLS``
    (linear: CB = the number of block columns; conv: CB = channel blocks per tap, COLS = C_in)."""
    p = tl.program_id(0)
    r = tl.load(block_row_ptr + p)
    c = tl.load(col_idx_ptr + p)
    offs_i = tl.arange(0, BM)
    offs_j = tl.arange(0, BK)
    inner = offs_i[:, None] * BK + offs_j[None, :]
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    pp = p.to(tl.int64)
    for s in range(0, SPLITS):
        acc += tl.load(part_ptr + (s * NNZ + pp) * (BM * BK) + inner)
    w_ok = ((r * BM + offs_i) < ROWS)[:, None] & (((c % CB) * BK + offs_j) < COLS)[None, :]
    origin = block_origin(p, r, c, CB, W_ROW, TAP, DENSE, BM, BK)
    store_block(dw_ptr, keep_ptr, origin, W_ROW if DENSE else BK, w_ok, acc, MASKED, BM, BK)


def dw_splits(nnz: int, rows: int) -> int:
    """How many ways to split dW's reduction over ``rows`` batch rows: enough programs for ~2 per
    SM of an H100 (132 SMs; at d=0.05 a 4096x4096 layer has only 51 blocks of 128x128), each
    reducing at least 2048 rows. Under the interpreter: 2 once rows > 64, so tests cover both
    paths."""
    if nnz == 0:
        return 1
    if interpreter_enabled():
        return 1 if rows <= 64 else 2
    return max(1, min(-(-264 // nnz), -(-rows // 2048)))


def m_bucket(m: int) -> int:
    """The autotuner's key for a token (or pixel) count: the next power of two, so a new batch
    size inside the same bucket reuses the tuned config instead of benchmarking again."""
    return 1 << max(0, (max(m, 1) - 1).bit_length())


class Layout(NamedTuple):
    """Block metadata the kernels read (int32 indices on the weight's device).

    ``shape``: the weight's shape ((N, K) for a linear weight, (C_out, C_in, kH, kW) for a conv
    weight); ``block`` (bm, bk); ``nnz`` stored blocks; ``row_ptr [R+1]``, ``col_idx [nnz]``,
    ``block_row [nnz]`` (row-major order, the order of compact values); ``col_ptr [C+1]``,
    ``t_row [nnz]``, ``t_perm [nnz]`` (column-major order: stored block ``t_perm[q]`` is the
    q-th of its column); ``dense``: the storage is a dense weight (else compact values);
    ``keep``: the mask as bytes when pruned weights inside kept blocks must get exactly zero
    gradient (dW's epilogue), else None.
    """

    shape: tuple[int, ...]
    block: tuple[int, int]
    nnz: int
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    block_row: torch.Tensor
    col_ptr: torch.Tensor
    t_row: torch.Tensor
    t_perm: torch.Tensor
    dense: bool
    keep: torch.Tensor | None


def layout_from_occupancy(occ: torch.Tensor, shape, block, dense: bool, keep) -> Layout:
    """A layout from the ``[R, C]`` bool grid of stored blocks (row-major block order)."""
    R, C = occ.shape
    r_idx, c_idx = occ.nonzero(as_tuple=True)  # row-major, as BlockSparseMatrix stores values
    row_ptr = torch.cat([occ.new_zeros(1, dtype=torch.long), occ.sum(1).cumsum(0)])
    col_ptr = torch.cat([occ.new_zeros(1, dtype=torch.long), occ.sum(0).cumsum(0)])
    order = torch.argsort(c_idx * max(R, 1) + r_idx, stable=True)  # column-major, rows sorted
    i32 = torch.int32
    return Layout(
        tuple(shape), tuple(block), int(r_idx.numel()), row_ptr.to(i32), c_idx.to(i32),
        r_idx.to(i32), col_ptr.to(i32), r_idx[order].to(i32), order.to(i32), dense, keep,
    )  # fmt: skip


def block_keep(lay: Layout) -> tuple[torch.Tensor, bool]:
    """``(keep bytes or a placeholder pointer, MASKED)`` for a launch."""
    return (lay.keep, True) if lay.keep is not None else (lay.row_ptr, False)
