"""block_sparse_linear: ``y = x W^T + b`` for a block-sparse W, visiting only the stored blocks.

Three GEMMs, three Triton kernels, each touching only stored blocks of W (and of dW):

* forward ``y [M, N]  = x [M, K] @ W^T``  ``_bsr_fwd_kernel``: one program per (row tile of x,
  block-row r of W); it walks the stored blocks of r (``row_ptr``/``col_idx``), loads the matching
  ``BLOCK_M x bk`` slice of x and accumulates ``x_slice @ block^T`` into ``BLOCK_M x bm`` outputs.
  An empty block-row writes the bias (or zeros) and loads nothing.
* dX ``dx [M, K] = dy [M, N] @ W``  ``_bsr_dx_kernel``: one program per (row tile, block-column c),
  walking c's stored blocks through the transpose metadata (``col_ptr``/``t_row``/``t_perm``): no
  transposed copy of the weights exists.
* dW ``dW[block p] = dy[:, rows of p]^T @ x[:, cols of p]``  ``_bsr_dw_kernel``: one program per
  stored block, reducing over the batch; pruned blocks get no program, no load and no store.

One set of kernels serves two storages of W, through a per-block element offset ``blk_off`` and
in-block strides (``_Layout``):

* compact (``BlockSparseMatrix.values [nnz, bm, bk]``, block p at ``p * bm * bk``): inference
  and training with memory that falls with density (``block_sparse_linear``);
* dense ``weight [N, K]`` with a block-structured ``mask`` (block (r, c) at ``r*bm*K + c*bk``):
  ``SparseLinear(block_size=...)`` trains a normal dense Parameter (any optimizer, the mask
  invariant of ``set_mask``) while the kernels skip its pruned blocks (``block_masked_linear``).
  If the mask is not made of whole blocks, the kernels also apply it inside the kept blocks (one
  byte per weight loaded), so ``y = x (W*M)^T`` and ``dW`` is exactly 0 at every pruned weight.

Edge blocks of a matrix whose sizes are not multiples of the block are bound-checked on every
load and store, so the padding of compact blocks and the memory past a dense weight never matter.

Layers: ``@triton.jit`` kernels -> launchers (``bsr_{fwd,dx,dw}_launch``: check, allocate, launch)
-> ``_BlockSparseFunction`` (autograd) -> ``block_sparse_linear`` / ``block_masked_linear``. The
reference twin (``block_sparse_linear_reference``) is ``F.linear`` on the densified matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sparsekern.formats.block_sparse import (
    BlockSparseMatrix,
    _pair,
    block_grid,
    block_occupancy,
)
from sparsekern.ops._dispatch import interpreter_enabled, use_kernels
from sparsekern.ops._mask_cache import cached_on_mask
from sparsekern.ops.masked_linear import (
    KERNEL_DTYPES,
    _out,
    _precision,
    _upcast,
    masked_linear,
)

__all__ = [
    "block_sparse_linear",
    "block_sparse_linear_reference",
    "block_masked_linear",
    "bsr_fwd_launch",
    "bsr_dx_launch",
    "bsr_dw_launch",
    "layout_of_matrix",
    "layout_of_mask",
]

# ---------------------------------------------------------------------------------------------
# Autotune configs (data). The block shape (bm, bk) is fixed by the matrix, so the configs pick
# the batch tile BLOCK_M (forward/dX: rows of x per program; dW: batch rows reduced per step),
# warps and pipeline stages; the autotuner keys on M, N, K and the block shape. BLOCK_M=16 is
# there for batch-1..16 inference, where a bigger tile would multiply zeros.
# Tuple: (BLOCK_M, num_warps, num_stages).
# ---------------------------------------------------------------------------------------------
_GPU_CONFIGS = {
    "fwd": [(16, 4, 3), (64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (64, 4, 5)],
    "dx": [(16, 4, 3), (64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (64, 4, 5)],
    "dw": [(32, 4, 3), (64, 4, 3), (64, 4, 5), (128, 4, 3), (128, 8, 4), (256, 8, 3)],
}
_INTERPRETER_CONFIG = (32, 4, 1)


def batch_tile_configs(gpu_rows, interpreter_row=_INTERPRETER_CONFIG) -> list[triton.Config]:
    """``triton.Config`` objects from ``(BLOCK_M, num_warps, num_stages)`` rows; under the
    interpreter only ``interpreter_row``."""
    rows = [interpreter_row] if interpreter_enabled() else gpu_rows
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in rows]


def _configs(kind: str) -> list[triton.Config]:
    return batch_tile_configs(_GPU_CONFIGS[kind])


def _prune_smem(configs, named_args, **kwargs):
    """Drop configs whose tiles cannot fit: a BLOCK_M x 128 fp32 tile per stage at BLOCK_M=256 is
    128 KiB, x3 stages > the 227 KiB of an H100 SM. Keep at least one."""
    bm, bk = kwargs.get("BM", 32), kwargs.get("BK", 32)
    first = next(iter(named_args.values()), None)  # x (forward) or dy (dX, dW): the dtype
    esize = first.element_size() if isinstance(first, torch.Tensor) else 2
    kept = [
        c
        for c in configs
        if (c.kwargs["BLOCK_M"] * max(bm, bk) + bm * bk) * esize * max(c.num_stages, 1)
        <= 200 * 1024
    ]
    return kept or configs[-1:]


_AUTOTUNE_KEY = ["M", "N", "K", "BM", "BK"]


@triton.jit
def _block_offsets(off, stride_wr, stride_wc, BM: tl.constexpr, BK: tl.constexpr):
    """Element offsets ``[BM, BK]`` of the block that starts at ``off`` (int64)."""
    return off + tl.arange(0, BM)[:, None] * stride_wr + tl.arange(0, BK)[None, :] * stride_wc


@triton.jit
def _load_block(w_ptr, keep_ptr, w_off, w_ok, MASKED: tl.constexpr):
    """A stored block ``w[w_off]`` (zero outside ``w_ok``, the matrix); with MASKED the mask (read
    as bytes at the same offsets) is applied inside the block too."""
    w = tl.load(w_ptr + w_off, mask=w_ok, other=0.0)
    if MASKED:  # mask not made of whole blocks: apply it inside the kept block too
        keep = tl.load(keep_ptr + w_off, mask=w_ok, other=0)
        w = tl.where(keep != 0, w, tl.zeros_like(w))
    return w


@triton.jit
def _store_block(dw_ptr, keep_ptr, w_off, w_ok, acc, MASKED: tl.constexpr):
    """Store a block's fp32 gradient ``acc`` at ``dw[w_off]`` (inside ``w_ok``); with MASKED it is
    exactly 0 at pruned weights inside the kept block."""
    if MASKED:
        keep = tl.load(keep_ptr + w_off, mask=w_ok, other=0)
        acc = tl.where(keep != 0, acc, tl.zeros_like(acc))
    tl.store(dw_ptr + w_off, acc.to(dw_ptr.dtype.element_ty), mask=w_ok)


@triton.autotune(
    configs=_configs("fwd"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_smem}
)
@triton.jit
def _bsr_fwd_kernel(
    x_ptr, w_ptr, blk_off_ptr, row_ptr_ptr, col_idx_ptr, keep_ptr, bias_ptr, y_ptr,
    M, N, K, NUM_BLOCK_ROWS,
    stride_xm, stride_xk,
    stride_wr, stride_wc,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """y[M, N] = x[M, K] @ W[N, K]^T (+ bias); W given by its stored blocks."""
    pid = tl.program_id(0)
    r = pid % NUM_BLOCK_ROWS  # consecutive programs share the same rows of x (L2 reuse)
    pid_m = pid // NUM_BLOCK_ROWS
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_i = tl.arange(0, BM)
    offs_j = tl.arange(0, BK)
    m_ok = offs_m < M
    n_idx = r * BM + offs_i
    n_ok = n_idx < N
    start = tl.load(row_ptr_ptr + r)
    end = tl.load(row_ptr_ptr + r + 1)
    acc = tl.zeros((BLOCK_M, BM), dtype=tl.float32)
    for p in range(start, end):
        c = tl.load(col_idx_ptr + p)
        off = tl.load(blk_off_ptr + p)  # int64 element offset of the block
        k_idx = (c * BK + offs_j).to(tl.int64)
        k_ok = k_idx < K
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k_idx[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_off = _block_offsets(off, stride_wr, stride_wc, BM, BK)
        w = _load_block(w_ptr, keep_ptr, w_off, n_ok[:, None] & k_ok[None, :], MASKED)  # [BM, BK]
        if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 is exact there
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n_idx, mask=n_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + n_idx[None, :].to(tl.int64) * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(
    configs=_configs("dx"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_smem}
)
@triton.jit
def _bsr_dx_kernel(
    dy_ptr, w_ptr, t_off_ptr, col_ptr_ptr, t_row_ptr, keep_ptr, dx_ptr,
    M, N, K, NUM_BLOCK_COLS,
    stride_dym, stride_dyn,
    stride_wr, stride_wc,
    stride_dxm, stride_dxk,
    MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dx[M, K] = dy[M, N] @ W[N, K]; walks block-column c of W through the transpose metadata."""
    pid = tl.program_id(0)
    c = pid % NUM_BLOCK_COLS
    pid_m = pid // NUM_BLOCK_COLS
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_i = tl.arange(0, BM)
    offs_j = tl.arange(0, BK)
    m_ok = offs_m < M
    k_idx = (c * BK + offs_j).to(tl.int64)
    k_ok = k_idx < K
    start = tl.load(col_ptr_ptr + c)
    end = tl.load(col_ptr_ptr + c + 1)
    acc = tl.zeros((BLOCK_M, BK), dtype=tl.float32)
    for q in range(start, end):
        r = tl.load(t_row_ptr + q)
        off = tl.load(t_off_ptr + q)
        n_idx = (r * BM + offs_i).to(tl.int64)
        n_ok = n_idx < N
        a = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + n_idx[None, :] * stride_dyn,
            mask=m_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        w_off = _block_offsets(off, stride_wr, stride_wc, BM, BK)
        w = _load_block(w_ptr, keep_ptr, w_off, n_ok[:, None] & k_ok[None, :], MASKED)  # [BM, BK]
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + k_idx[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.autotune(
    configs=_configs("dw"),
    key=_AUTOTUNE_KEY + ["CHUNK"],
    prune_configs_by={"early_config_prune": _prune_smem},
)
@triton.jit
def _bsr_dw_kernel(
    dy_ptr, x_ptr, blk_off_ptr, block_row_ptr, col_idx_ptr, keep_ptr, dw_ptr, part_ptr,
    M, N, K, CHUNK, NNZ,
    stride_dym, stride_dyn,
    stride_xm, stride_xk,
    stride_wr, stride_wc,
    SPLIT: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dW[block p] = dy[:, rows of p]^T @ x[:, cols of p], one program per (stored block p,
    batch split s) reducing rows ``[s*CHUNK, (s+1)*CHUNK)``. SPLIT: the fp32 partial goes to
    ``part[s, p]`` (summed by ``_bsr_dw_reduce_kernel``); else the block is written in place."""
    p = tl.program_id(0)
    s = tl.program_id(1)
    r = tl.load(block_row_ptr + p)
    c = tl.load(col_idx_ptr + p)
    offs_i = tl.arange(0, BM)
    offs_j = tl.arange(0, BK)
    n_idx = (r * BM + offs_i).to(tl.int64)
    k_idx = (c * BK + offs_j).to(tl.int64)
    n_ok = n_idx < N
    k_ok = k_idx < K
    m_start = s.to(tl.int64) * CHUNK
    m_end = tl.minimum(m_start + CHUNK, M)
    offs_m = m_start + tl.arange(0, BLOCK_M).to(tl.int64)
    a_ptrs = dy_ptr + n_idx[:, None] * stride_dyn + offs_m[None, :] * stride_dym  # [BM, BLOCK_M]
    b_ptrs = x_ptr + offs_m[:, None] * stride_xm + k_idx[None, :] * stride_xk  # [BLOCK_M, BK]
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for m0 in range(0, tl.cdiv(m_end - m_start, BLOCK_M)):
        m_ok = offs_m < m_end - m0 * BLOCK_M
        a = tl.load(a_ptrs, mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_M * stride_dym
        b_ptrs += BLOCK_M * stride_xm
    if SPLIT:
        base = (s.to(tl.int64) * NNZ + p) * (BM * BK)
        tl.store(part_ptr + base + offs_i[:, None] * BK + offs_j[None, :], acc)
    else:
        w_off = _block_offsets(tl.load(blk_off_ptr + p), stride_wr, stride_wc, BM, BK)
        _store_block(dw_ptr, keep_ptr, w_off, n_ok[:, None] & k_ok[None, :], acc, MASKED)


@triton.jit
def _bsr_dw_reduce_kernel(
    part_ptr, blk_off_ptr, block_row_ptr, col_idx_ptr, keep_ptr, dw_ptr,
    ROWS, COLS, CB, NNZ, SPLITS,
    stride_wr, stride_wc,
    MASKED: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """dW block p = sum_s part[s, p], masked inside the block if needed, stored in place. Block
    column c covers columns ``(c % CB) * BK + j < COLS`` (linear: CB = the number of block
    columns; conv: CB = channel blocks per tap, COLS = C_in)."""
    p = tl.program_id(0)
    r = tl.load(block_row_ptr + p)
    c = tl.load(col_idx_ptr + p)
    off = tl.load(blk_off_ptr + p)
    cb = c % CB
    offs_i = tl.arange(0, BM)
    offs_j = tl.arange(0, BK)
    inner = offs_i[:, None] * BK + offs_j[None, :]
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    pp = p.to(tl.int64)
    for s in range(0, SPLITS):
        acc += tl.load(part_ptr + (s * NNZ + pp) * (BM * BK) + inner)
    w_ok = ((r * BM + offs_i) < ROWS)[:, None] & ((cb * BK + offs_j) < COLS)[None, :]
    w_off = _block_offsets(off, stride_wr, stride_wc, BM, BK)
    _store_block(dw_ptr, keep_ptr, w_off, w_ok, acc, MASKED)


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


# ---------------------------------------------------------------------------------------------
# Layout: where each stored block lives, for both storages.
# ---------------------------------------------------------------------------------------------
class _Layout(NamedTuple):
    """Block metadata the kernels read (int32 indices, int64 element offsets, on W's device).

    ``shape``: the weight's shape ((N, K) for a linear weight, (C_out, C_in, kH, kW) for a conv
    weight, see ``block_sparse_conv2d``); ``block`` (bm, bk); ``nnz`` stored blocks;
    ``row_ptr [R+1]``, ``col_idx [nnz]``, ``block_row [nnz]``, ``blk_off [nnz]`` (row-major
    order); ``col_ptr [C+1]``, ``t_row [nnz]``, ``t_off [nnz]`` (column-major order); in-block
    strides ``(stride_r, stride_c)``; ``keep``: the mask as bytes when it must be applied inside
    kept blocks, else None.
    """

    shape: tuple[int, int]
    block: tuple[int, int]
    nnz: int
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    block_row: torch.Tensor
    blk_off: torch.Tensor
    col_ptr: torch.Tensor
    t_row: torch.Tensor
    t_off: torch.Tensor
    strides: tuple[int, int]
    keep: torch.Tensor | None


def layout_of_matrix(w: BlockSparseMatrix) -> _Layout:
    """The layout of a compact ``BlockSparseMatrix`` (block p at element ``p * bm * bk``)."""
    bm, bk = w.block_size
    blk_off = torch.arange(w.nnz_blocks, device=w.device, dtype=torch.int64) * (bm * bk)
    return _Layout(
        w.shape, (bm, bk), w.nnz_blocks, w.row_ptr, w.col_idx, w.block_row, blk_off,
        w.col_ptr, w.t_row, blk_off[w.t_perm.long()], (bk, 1), None,
    )  # fmt: skip


def layout_from_occupancy(occ, shape, block, blk_off_of, strides, keep) -> _Layout:
    """A layout from the ``[R, C]`` bool grid of stored blocks: ``blk_off_of(rows, cols)`` gives
    the int64 element offset of each block (row-major order) in the storage; ``strides`` are the
    in-block strides; ``keep`` the mask bytes to apply inside blocks, or None."""
    R, C = occ.shape
    r_idx, c_idx = occ.nonzero(as_tuple=True)  # row-major, as BlockSparseMatrix stores values
    blk_off = blk_off_of(r_idx, c_idx)
    row_ptr = torch.cat([occ.new_zeros(1, dtype=torch.long), occ.sum(1).cumsum(0)])
    col_ptr = torch.cat([occ.new_zeros(1, dtype=torch.long), occ.sum(0).cumsum(0)])
    order = torch.argsort(c_idx * max(R, 1) + r_idx, stable=True)  # column-major, rows sorted
    i32 = torch.int32
    return _Layout(
        tuple(shape), tuple(block), int(r_idx.numel()), row_ptr.to(i32), c_idx.to(i32),
        r_idx.to(i32), blk_off, col_ptr.to(i32), r_idx[order].to(i32), blk_off[order],
        tuple(strides), keep,
    )  # fmt: skip


def _compute_mask_layout(mask: torch.Tensor, block: tuple[int, int]) -> _Layout:
    bm, bk = block
    K = mask.shape[1]
    occ = block_occupancy(mask, block)  # [R, C]
    full = block_occupancy(~mask, block).logical_not()  # blocks with no False at all
    whole_blocks = bool((full | ~occ).all())  # every block is either all kept or all pruned
    # int64 offsets: r*bm*K passes 2^31 for big layers
    return layout_from_occupancy(
        occ, mask.shape, block, lambda r, c: r * (bm * K) + c * bk, (K, 1),
        None if whole_blocks else mask.view(torch.uint8),
    )  # fmt: skip


def layout_of_mask(mask: torch.Tensor, block_size) -> _Layout:
    """The layout of a dense contiguous weight ``[N, K]`` whose kept blocks are those of ``mask``
    holding any True. Cached on the mask; recomputed only when the mask changes."""
    block = _pair(block_size)
    return cached_on_mask(mask, f"bsr:{block}", lambda m: _compute_mask_layout(m, block))


# ---------------------------------------------------------------------------------------------
# Launchers: check, allocate, launch. x/dy are 2-D; ``out`` lets tests poison the output.
# ---------------------------------------------------------------------------------------------
def _check(name: str, lay: _Layout, w: torch.Tensor, **acts: torch.Tensor) -> None:
    dtype = w.dtype
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: kernels take float16, bfloat16 or float32, got {dtype}")
    for k, t in acts.items():
        if t.dim() != 2:
            raise ValueError(f"{name}: {k} must be 2-D, got shape {list(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{name}: {k} must have the weight's dtype {dtype}, got {t.dtype}")
        if t.device != w.device:
            raise ValueError(
                f"{name}: {k} must be on the weight's device {w.device}, got {t.device}"
            )
    if lay.row_ptr.device != w.device:
        raise ValueError(
            f"{name}: block metadata must be on the weight's device {w.device}, got "
            f"{lay.row_ptr.device}"
        )


def _keep(lay: _Layout) -> tuple[torch.Tensor, bool]:
    return (lay.keep, True) if lay.keep is not None else (lay.row_ptr, False)


def bsr_fwd_launch(x, w, lay: _Layout, bias=None, out=None) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W^T (+ bias [N])``; ``w`` is the storage ``lay`` indexes."""
    _check("block_sparse_linear forward", lay, w, x=x)
    M, K = x.shape
    N = lay.shape[0]
    y = _out(out, (M, N), x, x.dtype)
    R, _ = block_grid(lay.shape, lay.block)
    if M == 0 or N == 0:
        return y
    keep, masked = _keep(lay)
    grid = lambda meta: (R * triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _bsr_fwd_kernel[grid](
        x, w, lay.blk_off, lay.row_ptr, lay.col_idx, keep, bias if bias is not None else x, y,
        M, N, K, R,
        x.stride(0), x.stride(1),
        lay.strides[0], lay.strides[1],
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, MASKED=masked, UPCAST=_upcast(x.dtype),
        PRECISION=_precision(x.dtype), BM=lay.block[0], BK=lay.block[1],
    )  # fmt: skip
    return y


def bsr_dx_launch(dy, w, lay: _Layout, out=None) -> torch.Tensor:
    """``dx [M, K] = dy [M, N] @ W``."""
    _check("block_sparse_linear dx", lay, w, dy=dy)
    M, N = dy.shape
    K = lay.shape[1]
    dx = _out(out, (M, K), dy, dy.dtype)
    _, C = block_grid(lay.shape, lay.block)
    if M == 0 or K == 0:
        return dx
    keep, masked = _keep(lay)
    grid = lambda meta: (C * triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _bsr_dx_kernel[grid](
        dy, w, lay.t_off, lay.col_ptr, lay.t_row, keep, dx,
        M, N, K, C,
        dy.stride(0), dy.stride(1),
        lay.strides[0], lay.strides[1],
        dx.stride(0), dx.stride(1),
        MASKED=masked, UPCAST=_upcast(dy.dtype), PRECISION=_precision(dy.dtype),
        BM=lay.block[0], BK=lay.block[1],
    )  # fmt: skip
    return dx


def bsr_dw_launch(dy, x, w, lay: _Layout, out=None) -> torch.Tensor:
    """Gradient of the storage ``w``: stored blocks get ``dy^T x`` sampled there (masked inside a
    block when the layout says so); everything else is 0. ``out`` (w's shape) is written only
    at stored blocks, so pass a zeroed tensor, or None for a fresh zeroed one."""
    _check("block_sparse_linear dweight", lay, w, dy=dy, x=x)
    M, N = dy.shape
    K = x.shape[1]
    if out is None:
        dw = torch.zeros_like(w, memory_format=torch.contiguous_format)
    else:
        dw = _out(out, tuple(w.shape), w, w.dtype)
    if lay.nnz == 0:
        return dw
    keep, masked = _keep(lay)
    S = dw_splits(lay.nnz, M)
    chunk = -(-M // S)
    bm, bk = lay.block
    part = torch.empty((S, lay.nnz, bm, bk), device=w.device, dtype=torch.float32) if S > 1 else dw
    _bsr_dw_kernel[(lay.nnz, S)](
        dy, x, lay.blk_off, lay.block_row, lay.col_idx, keep, dw, part,
        M, N, K, chunk, lay.nnz,
        dy.stride(0), dy.stride(1),
        x.stride(0), x.stride(1),
        lay.strides[0], lay.strides[1],
        SPLIT=S > 1, MASKED=masked, UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
        BM=bm, BK=bk,
    )  # fmt: skip
    if S > 1:
        _, C = block_grid(lay.shape, lay.block)
        _bsr_dw_reduce_kernel[(lay.nnz,)](
            part, lay.blk_off, lay.block_row, lay.col_idx, keep, dw,
            N, K, C, lay.nnz, S,
            lay.strides[0], lay.strides[1],
            MASKED=masked, BM=bm, BK=bk,
        )  # fmt: skip
    return dw


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2:
        t = t.reshape(-1, t.shape[-1])
    return t if t.is_contiguous() else t.contiguous()


class _BlockSparseFunction(torch.autograd.Function):
    """Autograd over the storage tensor ``w`` (compact values or a dense weight) and a layout."""

    @staticmethod
    def forward(ctx, x, w, bias, lay):
        x2 = _rows(x)
        y = bsr_fwd_launch(x2, w, lay, bias)
        ctx.save_for_backward(x2, w)
        ctx.lay = lay
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], lay.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        lay = ctx.lay
        dy2 = _rows(dy)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = bsr_dx_launch(dy2, w, lay).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = bsr_dw_launch(dy2, x2, w, lay)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------
def block_sparse_linear_reference(
    x: torch.Tensor, weight: BlockSparseMatrix, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain PyTorch: ``F.linear(x, weight.to_dense(), bias)``; differentiable w.r.t. ``x``,
    ``weight.values`` (stored blocks only: ``to_dense`` scatters them) and ``bias``."""
    return F.linear(x, weight.to_dense(), bias)


def _autocast(x, w, bias):
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        dt = torch.get_autocast_dtype(dev)
        return x.to(dt), w.to(dt), None if bias is None else bias.to(dt)
    return x, w, bias


def _check_common(who: str, x, out_features: int, in_features: int, w: torch.Tensor, bias):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{who}: x must be a floating-point tensor, got {got}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{who}: x must have shape [..., {in_features}] (the weight's in_features), got "
            f"{list(x.shape)}"
        )
    if x.dtype != w.dtype:
        raise TypeError(f"{who}: x and weight dtypes differ: x {x.dtype}, weight {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"{who}: x is on {x.device} but the weight is on {w.device}")
    if bias is not None:
        if tuple(bias.shape) != (out_features,):
            raise ValueError(
                f"{who}: bias must have shape ({out_features},), got {tuple(bias.shape)}"
            )
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(
                f"{who}: bias must be {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}"
            )


def block_sparse_linear(
    x: torch.Tensor, weight: BlockSparseMatrix, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x @ weight.to_dense().T + bias``, touching only the stored blocks.

    Args:
        x: ``[..., in_features]`` float16, bfloat16 or float32 (float64 runs the reference).
        weight: ``BlockSparseMatrix`` of shape ``(out_features, in_features)``, x's dtype.
        bias: ``[out_features]`` or None.
    Returns:
        ``[..., out_features]``. Gradients go to ``x``, ``weight.values`` (``[nnz, bm, bk]``:
        stored blocks only, the padding of edge blocks gets 0) and ``bias``.
    """
    if not isinstance(weight, BlockSparseMatrix):
        raise TypeError(
            f"block_sparse_linear: weight must be a BlockSparseMatrix, got {type(weight).__name__}"
        )
    values = weight.values
    x, values, bias = _autocast(x, values, bias)
    if values is not weight.values:
        weight = BlockSparseMatrix(
            values, weight.row_ptr, weight.col_idx, weight.shape, weight.block_size,
            _validate=False,
        )  # fmt: skip
    _check_common("block_sparse_linear", x, weight.shape[0], weight.shape[1], values, bias)
    if not (use_kernels(x) and x.dtype in KERNEL_DTYPES):
        return block_sparse_linear_reference(x, weight, bias)
    lay = _layout_cache(weight)
    return _BlockSparseFunction.apply(x, values, bias, lay)


def _layout_cache(weight: BlockSparseMatrix) -> _Layout:
    lay = getattr(weight, "_layout", None)
    if lay is None or lay.row_ptr is not weight.row_ptr:
        lay = layout_of_matrix(weight)
        weight._layout = lay
    return lay


def block_masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size=(32, 32),
) -> torch.Tensor:
    """``y = x @ (weight * mask).T + bias`` on a dense weight, skipping the ``block_size`` blocks
    of ``mask`` that are all False in the forward, dX and dW (``SparseLinear``'s block mode).

    Same semantics and gradients as :func:`sparsekern.ops.masked_linear` (``dweight`` exactly 0
    where ``mask`` is False, nothing written at pruned blocks); time falls with the fraction of
    blocks kept. ``weight [out, in]`` must be contiguous; ``mask`` bool, its shape and device.
    """
    bm, bk = _pair(block_size)
    if not (use_kernels(x) and x.dtype in KERNEL_DTYPES):
        return masked_linear(x, weight, mask, bias)  # validates; reference on the CPU
    x, weight, bias = _autocast(x, weight, bias)
    if weight.dim() != 2:
        raise ValueError(
            f"block_masked_linear: weight must be 2-D [out, in], got {list(weight.shape)}"
        )
    if mask.dtype != torch.bool or mask.shape != weight.shape or mask.device != weight.device:
        raise ValueError(
            f"block_masked_linear: mask must be torch.bool of shape {list(weight.shape)} on "
            f"{weight.device}, got {mask.dtype} {list(mask.shape)} on {mask.device}"
        )
    if not (weight.is_contiguous() and mask.is_contiguous()):
        raise ValueError(
            "block_masked_linear: weight and mask must be contiguous (block offsets assume "
            f"row-major [out, in] storage), got strides {weight.stride()} and {mask.stride()}"
        )
    _check_common("block_masked_linear", x, weight.shape[0], weight.shape[1], weight, bias)
    lay = layout_of_mask(mask, (bm, bk))
    return _BlockSparseFunction.apply(x, weight, bias, lay)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see sparsekern.ops._compile_check).
# ---------------------------------------------------------------------------------------------
_SPEC_BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (64, 128), (128, 64), (16, 64)]


def compile_specs():
    """Yield ``(name, jit_fn, signature, constexprs, num_warps, num_stages)`` for each kernel,
    block shape, config and dtype."""
    i32 = "i32"
    for dt in ("bf16", "fp16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        kernels = {
            "fwd": (
                _bsr_fwd_kernel,
                {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "blk_off_ptr": "*i64",
                 "row_ptr_ptr": "*i32", "col_idx_ptr": "*i32", "keep_ptr": "*u8",
                 "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}", "M": i32, "N": i32, "K": i32,
                 "NUM_BLOCK_ROWS": i32, "stride_xm": i32, "stride_xk": i32, "stride_wr": i32,
                 "stride_wc": i32, "stride_ym": i32, "stride_yn": i32},
                {"HAS_BIAS": True},
            ),
            "dx": (
                _bsr_dx_kernel,
                {"dy_ptr": f"*{dt}", "w_ptr": f"*{dt}", "t_off_ptr": "*i64",
                 "col_ptr_ptr": "*i32", "t_row_ptr": "*i32", "keep_ptr": "*u8",
                 "dx_ptr": f"*{dt}", "M": i32, "N": i32, "K": i32, "NUM_BLOCK_COLS": i32,
                 "stride_dym": i32, "stride_dyn": i32, "stride_wr": i32, "stride_wc": i32,
                 "stride_dxm": i32, "stride_dxk": i32},
                {},
            ),
            "dw": (
                _bsr_dw_kernel,
                {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "blk_off_ptr": "*i64",
                 "block_row_ptr": "*i32", "col_idx_ptr": "*i32", "keep_ptr": "*u8",
                 "dw_ptr": f"*{dt}", "part_ptr": "*fp32", "M": i32, "N": i32, "K": i32,
                 "CHUNK": i32, "NNZ": i32, "stride_dym": i32,
                 "stride_dyn": i32, "stride_xm": i32, "stride_xk": i32, "stride_wr": i32,
                 "stride_wc": i32},
                {"SPLIT": False},
            ),
        }  # fmt: skip
        kernels["dw_split"] = (_bsr_dw_kernel, kernels["dw"][1], {"SPLIT": True})
        esize = 4 if dt == "fp32" else 2
        for kind, (kernel, sig, extra) in kernels.items():
            for bm, bk in _SPEC_BLOCKS:
                for block_m, w, s in _GPU_CONFIGS[kind.removesuffix("_split")]:
                    # The configs the launch-time pruning would drop are not compiled either.
                    if (block_m * max(bm, bk) + bm * bk) * esize * s > 200 * 1024:
                        continue
                    consts = {**extra, "MASKED": kind != "fwd", "UPCAST": False}
                    consts |= {"PRECISION": prec, "BM": bm, "BK": bk, "BLOCK_M": block_m}
                    name = f"block_sparse_linear.{kind}[{dt},b{bm}x{bk},m{block_m},w{w},s{s}]"
                    yield name, kernel.fn, sig, consts, w, s
        reduce_sig = {"part_ptr": "*fp32", "blk_off_ptr": "*i64", "block_row_ptr": "*i32",
                      "col_idx_ptr": "*i32", "keep_ptr": "*u8", "dw_ptr": f"*{dt}"}  # fmt: skip
        reduce_sig |= {k: i32 for k in ("ROWS", "COLS", "CB", "NNZ", "SPLITS")}
        reduce_sig |= {"stride_wr": i32, "stride_wc": i32}
        for bm, bk in _SPEC_BLOCKS:
            consts = {"MASKED": True, "BM": bm, "BK": bk}
            name = f"block_sparse_linear.dw_reduce[{dt},b{bm}x{bk}]"
            yield name, _bsr_dw_reduce_kernel, reduce_sig, consts, 4, 1
