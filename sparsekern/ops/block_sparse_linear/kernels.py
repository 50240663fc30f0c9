"""The Triton side of block_sparse_linear: three kernels, each touching only the stored blocks of
W (and of dW), and their launchers (check, allocate, launch).

* forward ``y [M, N] = x [M, K] @ W^T``  ``_bsr_fwd_kernel``: one program per (row tile of x,
  block-row r of W); it walks the stored blocks of r (``row_ptr``/``col_idx``), loads the matching
  ``BLOCK_M x bk`` slice of x and accumulates ``x_slice @ block^T`` into ``BLOCK_M x bm`` outputs.
  An empty block-row writes the bias (or zeros) and loads nothing.
* dX ``dx [M, K] = dy [M, N] @ W``  ``_bsr_dx_kernel``: one program per (row tile, block-column c),
  walking c's stored blocks through the transpose metadata (``col_ptr``/``t_row``/``t_perm``): no
  transposed copy of the weights exists.
* dW ``dW[block p] = dy[:, rows of p]^T @ x[:, cols of p]``  ``_bsr_dw_kernel``: one program per
  stored block (x a split of the batch when few blocks are stored: fp32 partials summed in a fixed
  order by ``bsr_dw_reduce_kernel``, deterministic); pruned blocks get no program, no load and no
  store. A mask with holes inside kept blocks is applied in dW's epilogue.

Block addresses are arithmetic (``_block_kernels``): every W and x/dy load is a 16-byte vector
load, software-pipelined (``cp.async``, ``warp_group_dot_wait {pendings = 1}`` on sm_90): see
``benchmarks/NOTES.md`` for the compiler figures at M=8192, N=K=4096. Edge blocks of a matrix
whose sizes are not multiples of the block are bound-checked on every load and store, so the
padding of compact blocks and the memory past a dense weight never matter.

Without triton this module still imports (``sparsekern.ops._triton``'s stand-ins); a launch
raises ``TritonUnavailable``.
"""

from __future__ import annotations

import torch

from sparsekern.formats.block_sparse import block_grid
from sparsekern.ops._block_kernels import (
    Layout,
    block_keep,
    block_origin,
    bsr_dw_reduce_kernel,
    dw_splits,
    m_bucket,
    store_block,
)
from sparsekern.ops._dispatch import use_kernels
from sparsekern.ops._launch import KERNEL_DTYPES, dot_precision, interpreter_upcast, out_tensor
from sparsekern.ops._tiles import batch_tile_configs
from sparsekern.ops._triton import require_triton, tl, triton

__all__ = ["bsr_dw_launch", "bsr_dx_launch", "bsr_fwd_launch"]

# ---------------------------------------------------------------------------------------------
# Autotune configs (data). The block shape (bm, bk) is fixed by the matrix, so the configs pick
# the batch tile BLOCK_M (forward/dX: rows of x per program; dW: batch rows reduced per step),
# warps and pipeline stages; the autotuner keys on the bucketed token count (next power of two:
# a new batch size in the same bucket does not re-tune), N, K and the block shape. BLOCK_M=16 is
# there for batch-1..16 inference, where a bigger tile would multiply zeros (it runs mma.sync:
# wgmma needs 64 rows per warpgroup).
# Tuple: (BLOCK_M, num_warps, num_stages).
# ---------------------------------------------------------------------------------------------
_GPU_CONFIGS = {
    "fwd": [(16, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (256, 8, 3), (64, 4, 5)],
    "dx": [(16, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (256, 8, 3), (64, 4, 5)],
    "dw": [(32, 4, 3), (64, 4, 3), (64, 4, 5), (128, 4, 3), (128, 8, 4), (256, 8, 3)],
}
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "BM", "BK"]
# Shared memory a config may ask for: one BLOCK_M x max(bm, bk) activation tile plus one block per
# stage (H100: 227 KiB per SM, less what Triton keeps for itself).
_SMEM_BUDGET = 200 * 1024


def _smem(block_m: int, bm: int, bk: int, esize: int, stages: int) -> int:
    return (block_m * max(bm, bk) + bm * bk) * esize * max(stages, 1)


def _configs(kind: str) -> list:
    return batch_tile_configs(_GPU_CONFIGS[kind])


def _prune_smem(configs, named_args, **kwargs):
    """Drop configs whose tiles cannot fit (a 256 x 128 bf16 tile per stage at 3 stages is 192 KiB
    plus the blocks). Keep at least one."""
    bm, bk = kwargs.get("BM", 32), kwargs.get("BK", 32)
    first = next(iter(named_args.values()), None)  # x (forward) or dy (dX, dW): the dtype
    esize = first.element_size() if isinstance(first, torch.Tensor) else 2
    kept = [
        c for c in configs
        if _smem(c.kwargs["BLOCK_M"], bm, bk, esize, c.num_stages) <= _SMEM_BUDGET
    ]  # fmt: skip
    return kept or configs[-1:]


@triton.autotune(
    configs=_configs("fwd"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_smem}
)
@triton.jit
def _bsr_fwd_kernel(
    x_ptr, w_ptr, row_ptr_ptr, col_idx_ptr, bias_ptr, y_ptr,
    M, N, K, NUM_BLOCK_ROWS, NUM_BLOCK_COLS, W_ROW, M_BUCKET,
    stride_xm, stride_xk,
    stride_ym, stride_yn,
    DENSE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
    w_row = W_ROW if DENSE else BK
    start = tl.load(row_ptr_ptr + r)
    end = tl.load(row_ptr_ptr + r + 1)
    acc = tl.zeros((BLOCK_M, BM), dtype=tl.float32)
    for p in range(start, end):
        c = tl.load(col_idx_ptr + p)
        k0 = tl.multiple_of(c * BK, BK)
        k_idx = k0 + offs_j
        k_ok = k_idx < K
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k_idx[None, :].to(tl.int64) * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_off = block_origin(p, r, c, NUM_BLOCK_COLS, W_ROW, 0, DENSE, BM, BK)
        w = tl.load(
            w_ptr + w_off + offs_i[:, None] * w_row + offs_j[None, :],
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BM, BK]
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
    dy_ptr, w_ptr, col_ptr_ptr, t_row_ptr, t_perm_ptr, dx_ptr,
    M, N, K, NUM_BLOCK_COLS, W_ROW, M_BUCKET,
    stride_dym, stride_dyn,
    stride_dxm, stride_dxk,
    DENSE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
    w_row = W_ROW if DENSE else BK
    start = tl.load(col_ptr_ptr + c)
    end = tl.load(col_ptr_ptr + c + 1)
    acc = tl.zeros((BLOCK_M, BK), dtype=tl.float32)
    for q in range(start, end):
        r = tl.load(t_row_ptr + q)
        p = tl.load(t_perm_ptr + q)
        n0 = tl.multiple_of(r * BM, BM)
        n_idx = n0 + offs_i
        n_ok = n_idx < N
        a = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + n_idx[None, :].to(tl.int64) * stride_dyn,
            mask=m_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        w_off = block_origin(p, r, c, NUM_BLOCK_COLS, W_ROW, 0, DENSE, BM, BK)
        w = tl.load(
            w_ptr + w_off + offs_i[:, None] * w_row + offs_j[None, :],
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BM, BK]
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + k_idx[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.autotune(
    configs=_configs("dw"),
    key=_AUTOTUNE_KEY + ["SPLITS"],
    prune_configs_by={"early_config_prune": _prune_smem},
)
@triton.jit
def _bsr_dw_kernel(
    dy_ptr, x_ptr, block_row_ptr, col_idx_ptr, keep_ptr, dw_ptr, part_ptr,
    M, N, K, CHUNK, NNZ, SPLITS, NUM_BLOCK_COLS, W_ROW, M_BUCKET,
    stride_dym, stride_dyn,
    stride_xm, stride_xk,
    DENSE: tl.constexpr, SPLIT: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
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
    n_idx = (tl.multiple_of(r * BM, BM) + offs_i).to(tl.int64)
    k_idx = (tl.multiple_of(c * BK, BK) + offs_j).to(tl.int64)
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
        origin = block_origin(p, r, c, NUM_BLOCK_COLS, W_ROW, 0, DENSE, BM, BK)
        w_row = W_ROW if DENSE else BK
        store_block(dw_ptr, keep_ptr, origin, w_row, n_ok[:, None] & k_ok[None, :], acc, MASKED,
                    BM, BK)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launchers: check, allocate, launch. x/dy are 2-D; ``out`` lets tests poison the output.
# ---------------------------------------------------------------------------------------------
def _check(name: str, lay: Layout, w: torch.Tensor, **acts: torch.Tensor) -> None:
    require_triton(name)
    dtype = w.dtype
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: kernels take float16, bfloat16 or float32, got {dtype}")
    if not w.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous weight storage, got strides {w.stride()}")
    for k, t in acts.items():
        if t.dim() != 2:
            raise ValueError(f"{name}: expected {k} 2-D, got shape {list(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{name}: expected {k} of the weight's dtype {dtype}, got {t.dtype}")
        if t.device != w.device:
            raise ValueError(
                f"{name}: expected {k} on the weight's device {w.device}, got {t.device}"
            )
    if lay.row_ptr.device != w.device:
        raise ValueError(
            f"{name}: expected block metadata on the weight's device {w.device}, got "
            f"{lay.row_ptr.device}"
        )


def bsr_fwd_launch(x, w, lay: Layout, bias=None, out=None) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W^T (+ bias [N])``; ``w`` is the storage ``lay`` indexes."""
    _check("block_sparse_linear forward", lay, w, x=x)
    M, K = x.shape
    N = lay.shape[0]
    y = out_tensor(out, (M, N), x, x.dtype)
    R, C = block_grid(lay.shape, lay.block)
    if M == 0 or N == 0:
        return y
    grid = lambda meta: (R * triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _bsr_fwd_kernel[grid](
        x, w, lay.row_ptr, lay.col_idx, bias if bias is not None else x, y,
        M, N, K, R, C, K, m_bucket(M),
        x.stride(0), x.stride(1),
        y.stride(0), y.stride(1),
        DENSE=lay.dense, HAS_BIAS=bias is not None, UPCAST=interpreter_upcast(x.dtype),
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
    grid = lambda meta: (C * triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _bsr_dx_kernel[grid](
        dy, w, lay.col_ptr, lay.t_row, lay.t_perm, dx,
        M, N, K, C, K, m_bucket(M),
        dy.stride(0), dy.stride(1),
        dx.stride(0), dx.stride(1),
        DENSE=lay.dense, UPCAST=interpreter_upcast(dy.dtype), PRECISION=dot_precision(dy.dtype),
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
    _, C = block_grid(lay.shape, lay.block)
    part = torch.empty((S, lay.nnz, bm, bk), device=w.device, dtype=torch.float32) if S > 1 else dw
    _bsr_dw_kernel[(lay.nnz, S)](
        dy, x, lay.block_row, lay.col_idx, keep, dw, part,
        M, N, K, chunk, lay.nnz, S, C, K, m_bucket(M),
        dy.stride(0), dy.stride(1),
        x.stride(0), x.stride(1),
        DENSE=lay.dense, SPLIT=S > 1, MASKED=masked, UPCAST=interpreter_upcast(x.dtype),
        PRECISION=dot_precision(x.dtype), BM=bm, BK=bk,
    )  # fmt: skip
    if S > 1:
        bsr_dw_reduce_kernel[(lay.nnz,)](
            part, lay.block_row, lay.col_idx, keep, dw,
            N, K, C, lay.nnz, S, K, 0,
            DENSE=lay.dense, MASKED=masked, BM=bm, BK=bk,
        )  # fmt: skip
    return dw


def _on_kernels(t: torch.Tensor) -> bool:
    """Whether the kernels run for activations like ``t`` (CUDA, or the CPU under
    ``TRITON_INTERPRET=1``, in a kernel dtype); else the CPU path or the reference."""
    return use_kernels(t) and t.dtype in KERNEL_DTYPES
