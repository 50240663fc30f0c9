"""The CPU path of block_sparse_linear: torch.sparse BSR products (MKL) over the stored blocks,
never a dense rebuild of the weight. Runs where the Triton kernels do not (CPU without
``TRITON_INTERPRET=1``, float64).

* forward ``(W_bsr @ x^T)^T``; dX ``(W^T_bsr @ dy^T)^T`` (``W^T``'s blocks: the stored ones in
  column order, transposed, a copy of the stored fraction cached on the storage);
* dW: ``dy[:, rows of p]^T @ x[:, cols of p]`` per stored block, batched (``baddbmm``) in row
  chunks; the dense storage's gradient scatters them into a zeroed ``[N, K]``.

MKL's BSR product takes square blocks only: rectangular blocks are split into
``gcd(bm, bk)``-square sub-blocks (the order cached on the column indices).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparsekern.formats.block_sparse import block_grid
from sparsekern.ops import _fresh
from sparsekern.ops._block_kernels import Layout
from sparsekern.ops._mask_cache import TensorRef, cached_on_mask
from sparsekern.ops._mask_pass import zero_pruned, zero_pruned_

__all__ = ["CPU_BSR_MAX_DENSITY", "CPU_BSR_MAX_DENSITY_TRAIN", "CPU_DTYPES"]

#: Block density above which SparseLinear's block mode on the CPU runs the dense GEMM instead:
#: MKL's BSR product over a quarter of the blocks is about as fast as the dense GEMM (measured by
#: benchmarks/bench_cpu_block_sparse.py), so past it sparsity would cost.
CPU_BSR_MAX_DENSITY = 0.25
#: The same bound when the weight's gradient is computed (a training step): dW then writes the
#: dense [N, K] gradient (151 MB for 9216x4096 fp32, on a pooled mapping: ops/_fresh.py), so the
#: step pays only at lower densities. Measured (bench_cpu_block_sparse.py, batch 64, 2 threads,
#: AVX-512 Xeon, 2026-12-08): 2.2-3.2x faster than dense at 5% of the blocks, 1.7x at 10% of
#: 32x32 blocks (earlier, before the pooled gradient: 0.45-0.96x at 25%, unmeasured since).
CPU_BSR_MAX_DENSITY_TRAIN = 0.1
CPU_DTYPES = (torch.float32, torch.float64)
# dW's batched block products materialise [nnz, bm + bk, rows] gathers: rows per chunk so that
# they stay under ~64 MiB.
_CPU_DW_BYTES = 64 << 20


def _pad2(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``t [r, c]`` zero-padded to ``[rows, cols]`` (``t`` itself when it fits)."""
    if t.shape[0] == rows and t.shape[1] == cols:
        return t
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def _grid_shape(lay: Layout) -> tuple[int, int, int, int]:
    R, C = block_grid(lay.shape, lay.block)
    return R, C, R * lay.block[0], C * lay.block[1]


def _gather_values(w: torch.Tensor, lay: Layout) -> torch.Tensor:
    bm, bk = lay.block
    R, C, Np, Kp = _grid_shape(lay)
    wp = _pad2(w, Np, Kp)
    return wp.view(R, bm, C, bk).permute(0, 2, 1, 3)[lay.block_row.long(), lay.col_idx.long()]


def _cpu_values(w: torch.Tensor, lay: Layout) -> torch.Tensor:
    """``[nnz, bm, bk]``: the stored blocks of the storage ``w`` (compact: ``w`` itself; dense:
    gathered from the weight, a copy of the stored fraction only, cached on the weight until it
    changes: the forward gathers, the backward reuses)."""
    if not lay.dense:
        return w
    key = (TensorRef(lay.col_idx), lay.block)
    return cached_on_mask(w, "bsr_values", lambda t: _gather_values(t, lay), key)


def _cpu_values_t(w: torch.Tensor, lay: Layout) -> torch.Tensor:
    """``[nnz, bk, bm]``: the blocks of ``W^T`` in its row-major order (the stored blocks in
    column order, transposed), contiguous; cached on the storage until it changes."""
    key = (TensorRef(lay.t_perm), lay.block)
    compute = lambda t: _cpu_values(t, lay)[lay.t_perm.long()].transpose(1, 2).contiguous()  # noqa: E731
    return cached_on_mask(w, "bsr_values_t", compute, key)


def _square_order(brow: torch.Tensor, bcol: torch.Tensor, a: int, b: int, n_rows: int):
    """For blocks split into ``a x b`` square sub-blocks: ``(crow, col, order)`` of the sub-block
    BSR (MKL's BSR product takes square blocks only) with ``order`` indexing the sub-blocks as
    ``values.view(n, a, g, b, g).permute(0, 1, 3, 2, 4).reshape(n * a * b, g, g)``."""
    n = brow.numel()
    i = torch.arange(a, device=brow.device).view(1, a, 1)
    j = torch.arange(b, device=brow.device).view(1, 1, b)
    sub_row = (brow.long().view(n, 1, 1) * a + i).expand(n, a, b).reshape(-1)
    sub_col = (bcol.long().view(n, 1, 1) * b + j).expand(n, a, b).reshape(-1)
    order = torch.argsort(sub_row * (sub_col.max() + 1 if n else 1) + sub_col)
    counts = torch.bincount(sub_row, minlength=n_rows * a)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return crow, sub_col[order], order


def _bsr(values, brow, bcol, crow, rows: int, cols: int) -> torch.Tensor:
    """The torch BSR tensor of blocks ``values [n, h, w]`` at block rows ``brow`` / block columns
    ``bcol`` (row-major order, ``crow`` their block-row pointers) of a ``rows x cols`` matrix.
    Rectangular blocks are split into ``gcd(h, w)``-square ones (a copy of the stored blocks)."""
    h, w = values.shape[1], values.shape[2]
    if h != w:
        g = math.gcd(h, w)
        a, b = h // g, w // g
        crow, col, order = cached_on_mask(
            bcol, f"sqbsr:{h}x{w}:{rows}", lambda _: _square_order(brow, bcol, a, b, rows // h)
        )
        n = values.shape[0]
        values = values.view(n, a, g, b, g).permute(0, 1, 3, 2, 4).reshape(n * a * b, g, g)[order]
        return torch.sparse_bsr_tensor(crow, col, values, size=(rows, cols), check_invariants=False)
    return torch.sparse_bsr_tensor(crow, bcol, values, size=(rows, cols), check_invariants=False)


def _cpu_fwd(x2, w, lay: Layout, bias):
    """``y [M, N] = x [M, K] @ W^T + bias``: ``(W_bsr @ x^T)^T``."""
    R, C, Np, Kp = _grid_shape(lay)
    M, N = x2.shape[0], lay.shape[0]
    xt = _pad2(x2, M, Kp).t()
    wb = _bsr(_cpu_values(w, lay), lay.block_row, lay.col_idx, lay.row_ptr, Np, Kp)
    y = torch.sparse.mm(wb, xt)
    y = y.t()[:, :N]
    return y + bias if bias is not None else y.contiguous()


def _cpu_dx(dy2, w, lay: Layout):
    """``dx [M, K] = dy [M, N] @ W``: ``(W^T_bsr @ dy^T)^T``; ``W^T``'s blocks are the stored
    ones in column order, transposed (a copy of the stored fraction)."""
    R, C, Np, Kp = _grid_shape(lay)
    M = dy2.shape[0]
    t_col = lay.col_idx[lay.t_perm.long()]  # block column of each block, in column order
    wt = _bsr(_cpu_values_t(w, lay), t_col, lay.t_row, lay.col_ptr, Kp, Np)
    dx = torch.sparse.mm(wt, _pad2(dy2, M, Np).t())
    return dx.t()[:, : lay.shape[1]].contiguous()


def _cpu_dvalues(dy2, x2, lay: Layout) -> torch.Tensor:
    """``[nnz, bm, bk]``: ``dy[:, rows of p]^T @ x[:, cols of p]`` per stored block, batched,
    in row chunks that keep the gathers small."""
    bm, bk = lay.block
    R, C, Np, Kp = _grid_shape(lay)
    M = dy2.shape[0]
    out = torch.zeros((lay.nnz, bm, bk), dtype=x2.dtype, device=x2.device)
    if lay.nnz == 0 or M == 0:
        return out
    rows, cols = lay.block_row.long(), lay.col_idx.long()
    step = max(1, _CPU_DW_BYTES // (lay.nnz * (bm + bk) * x2.element_size()))
    for m0 in range(0, M, step):
        d = _pad2(dy2[m0 : m0 + step], min(step, M - m0), Np)
        xs = _pad2(x2[m0 : m0 + step], d.shape[0], Kp)
        a = d.view(-1, R, bm)[:, rows].permute(1, 2, 0)  # [nnz, bm, m]
        b = xs.view(-1, C, bk)[:, cols].permute(1, 0, 2)  # [nnz, m, bk]
        out.baddbmm_(a, b)
    return out


def _cpu_dw(dy2, x2, w, lay: Layout):
    """The storage's gradient: compact ``[nnz, bm, bk]``, or the dense weight's ``[N, K]`` with
    zeros outside the stored blocks (and at pruned weights inside them)."""
    dv = _cpu_dvalues(dy2, x2, lay)
    if not lay.dense:
        return dv
    bm, bk = lay.block
    R, C, Np, Kp = _grid_shape(lay)
    if _fresh.fresh_ok(w, Np * Kp):  # a pooled huge-page mapping (ops/_fresh.py)
        g = _fresh.fresh_zeros((Np, Kp))
    else:
        g = torch.zeros((Np, Kp), dtype=w.dtype, device=w.device)
    g.view(R, bm, C, bk).permute(0, 2, 1, 3)[lay.block_row.long(), lay.col_idx.long()] = dv
    g = g[: lay.shape[0], : lay.shape[1]]
    if lay.keep is not None:
        keep = lay.keep.view(torch.bool)
        in_place = g.is_contiguous() and not g.requires_grad  # (create_graph: out of place)
        g = zero_pruned_(g, keep) if in_place else zero_pruned(g, keep)
    return g if g.is_contiguous() else g.contiguous()
