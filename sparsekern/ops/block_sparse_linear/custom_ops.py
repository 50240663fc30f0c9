"""The custom ops and autograd of block_sparse_linear.

* Implementations on 2-D activations, one per (storage, GEMM), shared by eager mode and the
  custom ops: the Triton kernels where they run (``kernels``), else the CPU path (``cpu``).
  Storage "masked": a dense weight ``[N, K]`` and its bool mask (layout cached on the mask);
  "compact": values ``[nnz, bm, bk]`` with the matrix's six metadata tensors.
* ``torch.library`` custom ops ``sparsekern::block_{masked,sparse}_linear_{fwd,dx,dw}``: opaque to
  torch.compile, so a compiled model runs the same kernels (and the same layout caches) as eager
  mode.
* ``_BlockSparseFunction``: autograd over the storage tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsekern.formats.block_sparse import BlockSparseMatrix
from sparsekern.ops._launch import as_rows, twin_vjp
from sparsekern.ops.block_sparse_linear.cpu import _cpu_dw, _cpu_dx, _cpu_fwd
from sparsekern.ops.block_sparse_linear.kernels import (
    _on_kernels,
    bsr_dw_launch,
    bsr_dx_launch,
    bsr_fwd_launch,
)
from sparsekern.ops.block_sparse_linear.layout import _compact_layout, layout_of_mask

__all__: list[str] = []


def _fwd(x, w, lay, bias):
    return bsr_fwd_launch(x, w, lay, bias) if _on_kernels(x) else _cpu_fwd(x, w, lay, bias)


def _dx(dy, w, lay):
    return bsr_dx_launch(dy, w, lay) if _on_kernels(dy) else _cpu_dx(dy, w, lay)


def _dw(dy, x, w, lay):
    return bsr_dw_launch(dy, x, w, lay) if _on_kernels(x) else _cpu_dw(dy, x, w, lay)


def _masked_fwd(x, w, mask, bias, bm: int, bk: int):
    return _fwd(x, w, layout_of_mask(mask, (bm, bk)), bias)


def _masked_dx(dy, w, mask, bm: int, bk: int):
    return _dx(dy, w, layout_of_mask(mask, (bm, bk)))


def _masked_dw(dy, x, w, mask, bm: int, bk: int):
    return _dw(dy, x, w, layout_of_mask(mask, (bm, bk)))


def _compact_fwd(x, values, meta, bias, rows: int, cols: int):
    return _fwd(x, values, _compact_layout(values, meta, rows, cols), bias)


def _compact_dx(dy, values, meta, rows: int, cols: int):
    return _dx(dy, values, _compact_layout(values, meta, rows, cols))


def _compact_dw(dy, x, values, meta, rows: int, cols: int):
    return _dw(dy, x, values, _compact_layout(values, meta, rows, cols))


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
    x: torch.Tensor, values: torch.Tensor, meta: list[torch.Tensor], bias: torch.Tensor | None,
    rows: int, cols: int,
) -> torch.Tensor:  # fmt: skip
    return _compact_fwd(x, values, meta, bias, rows, cols)


@_compact_fwd_op.register_fake
def _(x, values, meta, bias, rows, cols):
    return x.new_empty((x.shape[0], rows))


@torch.library.custom_op("sparsekern::block_sparse_linear_dx", mutates_args=())
def _compact_dx_op(
    dy: torch.Tensor, values: torch.Tensor, meta: list[torch.Tensor], rows: int, cols: int
) -> torch.Tensor:
    return _compact_dx(dy, values, meta, rows, cols)


@_compact_dx_op.register_fake
def _(dy, values, meta, rows, cols):
    return dy.new_empty((dy.shape[0], cols))


@torch.library.custom_op("sparsekern::block_sparse_linear_dw", mutates_args=())
def _compact_dw_op(
    dy: torch.Tensor, x: torch.Tensor, values: torch.Tensor, meta: list[torch.Tensor],
    rows: int, cols: int,
) -> torch.Tensor:  # fmt: skip
    return _compact_dw(dy, x, values, meta, rows, cols)


@_compact_dw_op.register_fake
def _(dy, x, values, meta, rows, cols):
    return torch.empty_like(values, memory_format=torch.contiguous_format)


def _run(kind: str, gemm: str, *args):
    """One GEMM through its custom op under torch.compile, else the implementation directly (a
    custom op's dispatcher round trip costs tens of microseconds per call)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.sparsekern, f"{_OP_NAMES[kind]}_{gemm}")(*args)
    return _IMPLS[kind, gemm](*args)


def _dense_of(kind: str, w: torch.Tensor, meta, dims) -> torch.Tensor:
    """The dense ``[out, in]`` weight the kernels multiply by (differentiable in ``w``)."""
    if kind == "masked":
        return torch.where(meta[0], w, 0)
    rows, cols = dims
    m = BlockSparseMatrix(w, meta[0], meta[1], (rows, cols), tuple(w.shape[1:]), validate=False)
    return m.to_dense()


class _BlockSparseFunction(torch.autograd.Function):
    """Autograd over the storage tensor ``w`` (dense weight or compact values). ``meta``, ``dims``:
    ``[mask], (bm, bk)`` ("masked") or the matrix's six metadata tensors and ``(rows, cols)``
    ("compact")."""

    @staticmethod
    def forward(ctx, x, w, bias, kind, dims, *meta):
        x2 = as_rows(x)
        a = meta[0] if kind == "masked" else list(meta)
        y = _run(kind, "fwd", x2, w, a, bias, *dims)
        ctx.save_for_backward(x2, w, *meta)
        ctx.kind, ctx.dims, ctx.x_shape = kind, dims, x.shape
        ctx.has_bias = bias is not None
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, w, *meta = ctx.saved_tensors
        kind, dims = ctx.kind, ctx.dims
        a = meta[0] if kind == "masked" else list(meta)
        dy2 = as_rows(dy)
        if torch.is_grad_enabled():
            # create_graph=True: the kernels' backward is not differentiable; differentiate the
            # plain twin instead (exact; a dense recompute, only when a 2nd derivative is asked)
            dx, dw = twin_vjp(
                lambda x2, w: F.linear(x2, _dense_of(kind, w, meta, dims)), (x2, w),
                ctx.needs_input_grad[:2], dy2,
            )  # fmt: skip
            db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
            dx = None if dx is None else dx.reshape(ctx.x_shape)
            return (dx, dw, db, None, None) + (None,) * len(meta)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _run(kind, "dx", dy2, w, a, *dims).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = _run(kind, "dw", dy2, x2, w, a, *dims)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return (dx, dw, db, None, None) + (None,) * len(meta)
