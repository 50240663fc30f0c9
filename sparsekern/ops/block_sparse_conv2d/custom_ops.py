"""The custom ops and autograd of block_sparse_conv2d.

* Implementations, one per (storage, GEMM), shared by eager mode and the custom ops (the Triton
  launchers of ``kernels``; the conv has no CPU path of its own: ``op`` sends CPU tensors to
  ``masked_conv2d`` or the reference).
* ``torch.library`` custom ops ``sparsekern::block_{masked,sparse}_conv2d_{fwd,dx,dw}``: opaque to
  torch.compile, so a compiled model runs the same kernels.
* ``_BlockSparseConvFunction``: autograd over the storage tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsekern.ops._conv import conv_out_size
from sparsekern.ops._launch import twin_vjp
from sparsekern.ops.block_sparse_conv2d.kernels import (
    bsc_dw_launch,
    bsc_dx_launch,
    bsc_fwd_launch,
    nhwc,
)
from sparsekern.ops.block_sparse_conv2d.layout import _compact_conv_layout, conv_layout_of_mask

__all__: list[str] = []


# ---------------------------------------------------------------------------------------------
# Implementations, one per (storage, GEMM), shared by eager mode and the custom ops. geometry: the
# six ints (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w). Storage "masked": a dense
# channels_last weight and its bool mask (layout cached on the mask); "compact": values with the
# matrix's ten metadata tensors (ConvLayout order).
# ---------------------------------------------------------------------------------------------
def _geom6(geometry) -> tuple:
    g = [int(v) for v in geometry]
    return (g[0], g[1]), (g[2], g[3]), (g[4], g[5])


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
