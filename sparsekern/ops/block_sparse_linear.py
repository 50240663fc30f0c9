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
in-block strides (``Layout``):

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

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sparsekern.formats.block_sparse import (
    BlockSparseMatrix,
    block_grid,
    block_occupancy,
    block_size_pair,
)
from sparsekern.ops._block_kernels import (
    Layout,
    block_keep,
    block_offsets,
    bsr_dw_reduce_kernel,
    dw_splits,
    layout_from_occupancy,
    load_block,
    store_block,
)
from sparsekern.ops._dispatch import use_kernels
from sparsekern.ops._launch import (
    KERNEL_DTYPES,
    as_rows,
    autocast_to,
    dot_precision,
    interpreter_upcast,
    out_tensor,
)
from sparsekern.ops._mask_cache import cached_on_mask
from sparsekern.ops._tiles import batch_tile_configs
from sparsekern.ops._triton import require_triton, tl, triton
from sparsekern.ops.masked_linear import masked_linear
from sparsekern.ops.masked_weight import check_mask

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


def _configs(kind: str) -> list:
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
        w_off = block_offsets(off, stride_wr, stride_wc, BM, BK)
        w = load_block(w_ptr, keep_ptr, w_off, n_ok[:, None] & k_ok[None, :], MASKED)  # [BM, BK]
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
        w_off = block_offsets(off, stride_wr, stride_wc, BM, BK)
        w = load_block(w_ptr, keep_ptr, w_off, n_ok[:, None] & k_ok[None, :], MASKED)  # [BM, BK]
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
    ``part[s, p]`` (summed by ``bsr_dw_reduce_kernel``); else the block is written in place."""
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
        w_off = block_offsets(tl.load(blk_off_ptr + p), stride_wr, stride_wc, BM, BK)
        store_block(dw_ptr, keep_ptr, w_off, n_ok[:, None] & k_ok[None, :], acc, MASKED)


def layout_of_matrix(w: BlockSparseMatrix) -> Layout:
    """The layout of a compact ``BlockSparseMatrix`` (block p at element ``p * bm * bk``)."""
    bm, bk = w.block_size
    blk_off = torch.arange(w.nnz_blocks, device=w.device, dtype=torch.int64) * (bm * bk)
    return Layout(
        w.shape, (bm, bk), w.nnz_blocks, w.row_ptr, w.col_idx, w.block_row, blk_off,
        w.col_ptr, w.t_row, blk_off[w.t_perm.long()], (bk, 1), None,
    )  # fmt: skip


def _compute_mask_layout(mask: torch.Tensor, block: tuple[int, int]) -> Layout:
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


def layout_of_mask(mask: torch.Tensor, block_size) -> Layout:
    """The layout of a dense contiguous weight ``[N, K]`` whose kept blocks are those of ``mask``
    holding any True. Cached on the mask; recomputed only when the mask changes."""
    block = block_size_pair(block_size)
    return cached_on_mask(mask, f"bsr:{block}", lambda m: _compute_mask_layout(m, block))


# ---------------------------------------------------------------------------------------------
# Launchers: check, allocate, launch. x/dy are 2-D; ``out`` lets tests poison the output.
# ---------------------------------------------------------------------------------------------
def _check(name: str, lay: Layout, w: torch.Tensor, **acts: torch.Tensor) -> None:
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


def bsr_fwd_launch(x, w, lay: Layout, bias=None, out=None) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W^T (+ bias [N])``; ``w`` is the storage ``lay`` indexes."""
    _check("block_sparse_linear forward", lay, w, x=x)
    M, K = x.shape
    N = lay.shape[0]
    y = out_tensor(out, (M, N), x, x.dtype)
    R, _ = block_grid(lay.shape, lay.block)
    if M == 0 or N == 0:
        return y
    keep, masked = block_keep(lay)
    grid = lambda meta: (R * triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _bsr_fwd_kernel[grid](
        x, w, lay.blk_off, lay.row_ptr, lay.col_idx, keep, bias if bias is not None else x, y,
        M, N, K, R,
        x.stride(0), x.stride(1),
        lay.strides[0], lay.strides[1],
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, MASKED=masked, UPCAST=interpreter_upcast(x.dtype),
        PRECISION=dot_precision(x.dtype), BM=lay.block[0], BK=lay.block[1],
    )  # fmt: skip
    return y


def bsr_dx_launch(dy, w, lay: Layout, out=None) -> torch.Tensor:
    """``dx [M, K] = dy [M, N] @ W``."""
    _check("block_sparse_linear dx", lay, w, dy=dy)
    M, N = dy.shape
    K = lay.shape[1]
    dx = out_tensor(out, (M, K), dy, dy.dtype)
    _, C = block_grid(lay.shape, lay.block)
    if M == 0 or K == 0:
        return dx
    keep, masked = block_keep(lay)
    grid = lambda meta: (C * triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _bsr_dx_kernel[grid](
        dy, w, lay.t_off, lay.col_ptr, lay.t_row, keep, dx,
        M, N, K, C,
        dy.stride(0), dy.stride(1),
        lay.strides[0], lay.strides[1],
        dx.stride(0), dx.stride(1),
        MASKED=masked, UPCAST=interpreter_upcast(dy.dtype), PRECISION=dot_precision(dy.dtype),
        BM=lay.block[0], BK=lay.block[1],
    )  # fmt: skip
    return dx


def bsr_dw_launch(dy, x, w, lay: Layout, out=None) -> torch.Tensor:
    """Gradient of the storage ``w``: stored blocks get ``dy^T x`` sampled there (masked inside a
    block when the layout says so); everything else is 0. ``out`` (w's shape) is written only
    at stored blocks, so pass a zeroed tensor, or None for a fresh zeroed one."""
    _check("block_sparse_linear dweight", lay, w, dy=dy, x=x)
    M, N = dy.shape
    K = x.shape[1]
    if out is None:
        dw = torch.zeros_like(w, memory_format=torch.contiguous_format)
    else:
        dw = out_tensor(out, tuple(w.shape), w, w.dtype)
    if lay.nnz == 0:
        return dw
    keep, masked = block_keep(lay)
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
        SPLIT=S > 1, MASKED=masked, UPCAST=interpreter_upcast(x.dtype),
        PRECISION=dot_precision(x.dtype), BM=bm, BK=bk,
    )  # fmt: skip
    if S > 1:
        _, C = block_grid(lay.shape, lay.block)
        bsr_dw_reduce_kernel[(lay.nnz,)](
            part, lay.blk_off, lay.block_row, lay.col_idx, keep, dw,
            N, K, C, lay.nnz, S,
            lay.strides[0], lay.strides[1],
            MASKED=masked, BM=bm, BK=bk,
        )  # fmt: skip
    return dw


# ---------------------------------------------------------------------------------------------
# Implementations on 2-D activations, one per (storage, GEMM), shared by eager mode and the custom
# ops. Storage "masked": a dense weight [N, K] and its bool mask (layout cached on the mask);
# "compact": values [nnz, bm, bk] with row_ptr / col_idx (layout cached on row_ptr).
# ---------------------------------------------------------------------------------------------
def _compact_layout(values, row_ptr, col_idx, rows: int, cols: int) -> Layout:
    bm, bk = values.shape[1], values.shape[2]
    tag = f"bsr:{rows}x{cols}:{bm}x{bk}:{id(col_idx)}:{col_idx._version}:{col_idx.data_ptr()}"

    def compute(rp):
        m = BlockSparseMatrix(values, rp, col_idx, (rows, cols), (bm, bk), _validate=False)
        return layout_of_matrix(m)

    return cached_on_mask(row_ptr, tag, compute)


def _masked_fwd(x, w, mask, bias, bm: int, bk: int):
    return bsr_fwd_launch(x, w, layout_of_mask(mask, (bm, bk)), bias)


def _masked_dx(dy, w, mask, bm: int, bk: int):
    return bsr_dx_launch(dy, w, layout_of_mask(mask, (bm, bk)))


def _masked_dw(dy, x, w, mask, bm: int, bk: int):
    return bsr_dw_launch(dy, x, w, layout_of_mask(mask, (bm, bk)))


def _compact_fwd(x, values, row_ptr, col_idx, bias, rows: int, cols: int):
    return bsr_fwd_launch(x, values, _compact_layout(values, row_ptr, col_idx, rows, cols), bias)


def _compact_dx(dy, values, row_ptr, col_idx, rows: int, cols: int):
    return bsr_dx_launch(dy, values, _compact_layout(values, row_ptr, col_idx, rows, cols))


def _compact_dw(dy, x, values, row_ptr, col_idx, rows: int, cols: int):
    return bsr_dw_launch(dy, x, values, _compact_layout(values, row_ptr, col_idx, rows, cols))


_IMPLS = {
    ("masked", "fwd"): _masked_fwd, ("masked", "dx"): _masked_dx, ("masked", "dw"): _masked_dw,
    ("compact", "fwd"): _compact_fwd, ("compact", "dx"): _compact_dx,
    ("compact", "dw"): _compact_dw,
}  # fmt: skip
_OP_NAMES = {"masked": "block_masked_linear", "compact": "block_sparse_linear"}


# torch.library custom ops: opaque to torch.compile, so a compiled model runs the same kernels
# (and the same layout caches) as eager mode.
@torch.library.custom_op("sparsekern::block_masked_linear_fwd", mutates_args=())
def _masked_fwd_op(
    x: torch.Tensor,
    w: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    bm: int,
    bk: int,
) -> torch.Tensor:
    return _masked_fwd(x, w, mask, bias, bm, bk)


@_masked_fwd_op.register_fake
def _(x, w, mask, bias, bm, bk):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("sparsekern::block_masked_linear_dx", mutates_args=())
def _masked_dx_op(
    dy: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, bm: int, bk: int
) -> torch.Tensor:
    return _masked_dx(dy, w, mask, bm, bk)


@_masked_dx_op.register_fake
def _(dy, w, mask, bm, bk):
    return dy.new_empty((dy.shape[0], w.shape[1]))


@torch.library.custom_op("sparsekern::block_masked_linear_dw", mutates_args=())
def _masked_dw_op(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, bm: int, bk: int
) -> torch.Tensor:
    return _masked_dw(dy, x, w, mask, bm, bk)


@_masked_dw_op.register_fake
def _(dy, x, w, mask, bm, bk):
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.library.custom_op("sparsekern::block_sparse_linear_fwd", mutates_args=())
def _compact_fwd_op(
    x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
    bias: torch.Tensor | None, rows: int, cols: int,
) -> torch.Tensor:  # fmt: skip
    return _compact_fwd(x, values, row_ptr, col_idx, bias, rows, cols)


@_compact_fwd_op.register_fake
def _(x, values, row_ptr, col_idx, bias, rows, cols):
    return x.new_empty((x.shape[0], rows))


@torch.library.custom_op("sparsekern::block_sparse_linear_dx", mutates_args=())
def _compact_dx_op(
    dy: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
    rows: int, cols: int,
) -> torch.Tensor:  # fmt: skip
    return _compact_dx(dy, values, row_ptr, col_idx, rows, cols)


@_compact_dx_op.register_fake
def _(dy, values, row_ptr, col_idx, rows, cols):
    return dy.new_empty((dy.shape[0], cols))


@torch.library.custom_op("sparsekern::block_sparse_linear_dw", mutates_args=())
def _compact_dw_op(
    dy: torch.Tensor, x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
    col_idx: torch.Tensor, rows: int, cols: int,
) -> torch.Tensor:  # fmt: skip
    return _compact_dw(dy, x, values, row_ptr, col_idx, rows, cols)


@_compact_dw_op.register_fake
def _(dy, x, values, row_ptr, col_idx, rows, cols):
    return torch.empty_like(values, memory_format=torch.contiguous_format)


def _run(kind: str, gemm: str, *args):
    """One GEMM through its custom op under torch.compile, else the implementation directly (a
    custom op's dispatcher round trip costs tens of microseconds per call)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.sparsekern, f"{_OP_NAMES[kind]}_{gemm}")(*args)
    return _IMPLS[kind, gemm](*args)


class _BlockSparseFunction(torch.autograd.Function):
    """Autograd over the storage tensor ``w`` (dense weight or compact values). ``a``, ``b``,
    ``dims``: ``mask, None, (bm, bk)`` ("masked") or ``row_ptr, col_idx, (rows, cols)``
    ("compact")."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, kind, dims):
        x2 = as_rows(x)
        tensors = (a,) if kind == "masked" else (a, b)
        y = _run(kind, "fwd", x2, w, *tensors, bias, *dims)
        ctx.save_for_backward(x2, w, *tensors)
        ctx.kind, ctx.dims, ctx.x_shape = kind, dims, x.shape
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable: refuse, loudly
    def backward(ctx, dy):
        x2, w, *tensors = ctx.saved_tensors
        kind, dims = ctx.kind, ctx.dims
        dy2 = as_rows(dy)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _run(kind, "dx", dy2, w, *tensors, *dims).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = _run(kind, "dw", dy2, x2, w, *tensors, *dims)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------
def block_sparse_linear_reference(
    x: torch.Tensor, weight: BlockSparseMatrix, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain PyTorch: ``F.linear(x, weight.to_dense(), bias)``; differentiable w.r.t. ``x``,
    ``weight.values`` (stored blocks only: ``to_dense`` scatters them) and ``bias``."""
    return F.linear(x, weight.to_dense(), bias)


def _check_common(who: str, x, out_features: int, in_features: int, w: torch.Tensor, bias):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{who}: expected x as a floating-point tensor, got {got}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{who}: expected x of shape [..., {in_features}] (the weight's in_features), got "
            f"{list(x.shape)}"
        )
    if x.dtype != w.dtype:
        raise TypeError(f"{who}: expected x of the weight's dtype {w.dtype}, got {x.dtype}")
    if x.device != w.device:
        raise ValueError(f"{who}: expected x on the weight's device {w.device}, got {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,):
            got = list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{who}: expected bias of shape [{out_features}], got {got}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(
                f"{who}: expected bias as {x.dtype} on {x.device}, got {bias.dtype} on "
                f"{bias.device}"
            )


def block_sparse_linear(
    x: torch.Tensor, weight: BlockSparseMatrix, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x @ weight.to_dense().T + bias``, touching only the stored blocks.

    Args:
        x: ``[..., in_features]`` float16, bfloat16 or float32 (float64 runs the reference), any
            strides.
        weight: ``BlockSparseMatrix`` of shape ``(out_features, in_features)``, x's dtype.
        bias: ``[out_features]`` or None (any strides).
    Returns:
        ``[..., out_features]``. Gradients go to ``x``, ``weight.values`` (``[nnz, bm, bk]``:
        stored blocks only, the padding of edge blocks gets 0) and ``bias``.
    """
    if not isinstance(weight, BlockSparseMatrix):
        raise TypeError(
            f"block_sparse_linear: expected weight as a BlockSparseMatrix, got "
            f"{type(weight).__name__}"
        )
    values = weight.values
    x, values, bias = autocast_to(x, values, bias)
    if values is not weight.values:
        weight = BlockSparseMatrix(
            values, weight.row_ptr, weight.col_idx, weight.shape, weight.block_size,
            _validate=False,
        )  # fmt: skip
    _check_common("block_sparse_linear", x, weight.shape[0], weight.shape[1], values, bias)
    if not (use_kernels(x) and x.dtype in KERNEL_DTYPES):
        return block_sparse_linear_reference(x, weight, bias)
    require_triton("block_sparse_linear on this device")
    values = values if values.is_contiguous() else values.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _BlockSparseFunction.apply(
        x, values, bias, weight.row_ptr, weight.col_idx, "compact", tuple(weight.shape)
    )


def block_masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size=(32, 32),
    *,
    assume_pruned_zero: bool = False,
) -> torch.Tensor:
    """``y = x @ (weight * mask).T + bias`` on a dense weight, skipping the ``block_size`` blocks
    of ``mask`` that are all False in the forward, dX and dW (``SparseLinear``'s block mode).

    Same semantics and gradients as :func:`sparsekern.ops.masked_linear` (``dweight`` exactly 0
    where ``mask`` is False, nothing written at pruned blocks; pruned entries ignored, NaN
    included); time falls with the fraction of blocks kept. Any strides. Where the Triton kernels
    do not run (CPU without the interpreter, float64) this is ``masked_linear``, with
    ``assume_pruned_zero`` passed on.
    """
    bm, bk = block_size_pair(block_size)
    if not (use_kernels(x) and x.dtype in KERNEL_DTYPES):
        return masked_linear(x, weight, mask, bias, assume_pruned_zero=assume_pruned_zero)
    x, weight, bias = autocast_to(x, weight, bias)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"block_masked_linear: expected weight 2-D [out, in], got {got}")
    check_mask(mask, weight, "block_masked_linear")
    _check_common("block_masked_linear", x, weight.shape[0], weight.shape[1], weight, bias)
    require_triton("block_masked_linear on this device")
    # Block offsets assume row-major [out, in] storage: a strided weight runs on a contiguous copy
    # (its gradient flows back through the copy); the layout is cached on a contiguous mask.
    weight = weight if weight.is_contiguous() else weight.contiguous()
    mask = mask if mask.is_contiguous() else mask.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _BlockSparseFunction.apply(x, weight, bias, mask, None, "masked", (bm, bk))


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see sparsekern.ops._compile_check).
# ---------------------------------------------------------------------------------------------
_SPEC_BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (64, 128), (128, 64), (16, 64)]


def _bench_values(bm: int, bk: int) -> dict[str, dict[str, int]]:
    """Integer arguments of each kernel at the benchmark shape: M=8192 tokens, N=K=4096, compact
    storage at d = 0.1, contiguous activations; dW split in two (as ``dw_splits`` does when few
    blocks are stored)."""
    M, N, K = 8192, 4096, 4096
    R, C = N // bm, K // bk
    nnz = max(1, (R * C) // 10)
    w = {"stride_wr": bk, "stride_wc": 1}
    return {
        "fwd": {"M": M, "N": N, "K": K, "NUM_BLOCK_ROWS": R, "stride_xm": K, "stride_xk": 1,
                **w, "stride_ym": N, "stride_yn": 1},
        "dx": {"M": M, "N": N, "K": K, "NUM_BLOCK_COLS": C, "stride_dym": N, "stride_dyn": 1,
               **w, "stride_dxm": K, "stride_dxk": 1},
        "dw": {"M": M, "N": N, "K": K, "CHUNK": M // 2, "NNZ": nnz, "stride_dym": N,
               "stride_dyn": 1, "stride_xm": K, "stride_xk": 1, **w},
        "dw_reduce": {"ROWS": N, "COLS": K, "CB": C, "NNZ": nnz, "SPLITS": 2, **w},
    }  # fmt: skip


def _spec(name, fn, ptrs, values, consts, warps, stages, hot) -> dict:
    return {
        "name": name, "fn": fn, "signature": ptrs | {k: "i32" for k in values},
        "constexprs": consts, "values": values, "num_warps": warps, "num_stages": stages,
        "hot": hot,
    }  # fmt: skip


def compile_specs():
    """Yield one spec dict per kernel, block shape, config and dtype (``name``, ``fn``,
    ``signature``, ``constexprs``, ``values`` at M=8192, N=K=4096, ``num_warps``,
    ``num_stages``, ``hot``: the bf16 configs the launch-time pruning keeps)."""
    for dt in ("bf16", "fp16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        kernels = {
            "fwd": (
                _bsr_fwd_kernel,
                {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "blk_off_ptr": "*i64",
                 "row_ptr_ptr": "*i32", "col_idx_ptr": "*i32", "keep_ptr": "*u8",
                 "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}"},
                {"HAS_BIAS": True},
            ),
            "dx": (
                _bsr_dx_kernel,
                {"dy_ptr": f"*{dt}", "w_ptr": f"*{dt}", "t_off_ptr": "*i64",
                 "col_ptr_ptr": "*i32", "t_row_ptr": "*i32", "keep_ptr": "*u8",
                 "dx_ptr": f"*{dt}"},
                {},
            ),
            "dw": (
                _bsr_dw_kernel,
                {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "blk_off_ptr": "*i64",
                 "block_row_ptr": "*i32", "col_idx_ptr": "*i32", "keep_ptr": "*u8",
                 "dw_ptr": f"*{dt}", "part_ptr": "*fp32"},
                {"SPLIT": True},
            ),
        }  # fmt: skip
        esize = 4 if dt == "fp32" else 2
        for kind, (kernel, ptrs, extra) in kernels.items():
            for bm, bk in _SPEC_BLOCKS:
                values = _bench_values(bm, bk)[kind]
                for block_m, w, s in _GPU_CONFIGS[kind]:
                    # The configs the launch-time pruning would drop are not compiled either.
                    if (block_m * max(bm, bk) + bm * bk) * esize * s > 200 * 1024:
                        continue
                    consts = {**extra, "MASKED": kind != "fwd", "UPCAST": False}
                    consts |= {"PRECISION": prec, "BM": bm, "BK": bk, "BLOCK_M": block_m}
                    name = f"block_sparse_linear.{kind}[{dt},b{bm}x{bk},m{block_m},w{w},s{s}]"
                    yield _spec(name, kernel.fn, ptrs, values, consts, w, s, dt == "bf16")
        reduce_ptrs = {"part_ptr": "*fp32", "blk_off_ptr": "*i64", "block_row_ptr": "*i32",
                       "col_idx_ptr": "*i32", "keep_ptr": "*u8", "dw_ptr": f"*{dt}"}  # fmt: skip
        for bm, bk in _SPEC_BLOCKS:
            values = _bench_values(bm, bk)["dw_reduce"]
            consts = {"MASKED": True, "BM": bm, "BK": bk}
            name = f"block_sparse_linear.dw_reduce[{dt},b{bm}x{bk}]"
            yield _spec(name, bsr_dw_reduce_kernel.fn, reduce_ptrs, values, consts, 4, 1, False)
