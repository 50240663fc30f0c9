"""The tap-major GEMM view of a conv weight, its block layouts (both storages), and the conv
geometry arguments.

The view: ``W [C_out, C_in, kH, kW]`` is seen as the matrix ``[C_out, kH*kW*C_in_pad]`` with
columns ordered (kh, kw, ci) and ``C_in`` padded to a multiple of ``bk`` per tap, so every
``bm x bk`` block holds ``bm`` output channels x ``bk`` input channels of ONE kernel tap.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sparsekern.formats.block_sparse import BlockSparseMatrix, block_size_pair
from sparsekern.ops._block_kernels import Layout, layout_from_occupancy
from sparsekern.ops._conv import conv_pair
from sparsekern.ops._mask_cache import cached_on_mask, tensor_key

__all__ = [
    "ConvLayout",
    "cached_conv_layout_of_matrix",
    "conv_block_occupancy",
    "conv_layout_of_mask",
    "conv_layout_of_matrix",
    "conv_weight_from_gemm",
    "conv_weight_to_gemm",
]


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
    return _layout_of_indices(
        tuple(weight_shape), w.block_size, w.nnz_blocks, w.row_ptr,
        (w.col_idx, w.block_row, w.col_ptr, w.t_row, w.t_perm),
    )  # fmt: skip


def _layout_of_indices(weight_shape, block, nnz, row_ptr, rest) -> ConvLayout:
    c_out, c_in, kh, kw = weight_shape
    col_idx, block_row, col_ptr, t_row, t_perm = rest
    base = Layout(
        weight_shape, block, nnz, row_ptr, col_idx, block_row, col_ptr, t_row, t_perm, False, None
    )
    return _with_dx_lists(base, kh, kw, _cdiv(c_in, block[1]))


def cached_conv_layout_of_matrix(w: BlockSparseMatrix, weight_shape) -> ConvLayout:
    """:func:`conv_layout_of_matrix`, cached on ``w.row_ptr`` until any index tensor of ``w``
    changes (edited in place, or another tensor: object, version counter, data pointer), the
    block count or ``weight_shape`` does; the values are not part of the layout. What the
    forward asks on every call (the dX lists cost an argsort and a bincount over the blocks)."""
    shape = tuple(int(s) for s in weight_shape)
    rest = (w.col_idx, w.block_row, w.col_ptr, w.t_row, w.t_perm)
    key = (shape, w.block_size, w.nnz_blocks) + tensor_key(*rest)
    block, nnz = w.block_size, w.nnz_blocks
    # The closure holds the index tensors the key names by id (never the values).
    return cached_on_mask(
        w.row_ptr, "bsc_matrix", lambda rp: _layout_of_indices(shape, block, nnz, rp, rest), key
    )


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


_WHO = "block-sparse conv2d"  # who the geometry errors name


def _geometry_of(stride, padding, dilation):
    """``((sh, sw), (ph, pw), (dh, dw))`` from ints or pairs, checked."""
    return (
        conv_pair(stride, "stride", 1, _WHO),
        conv_pair(padding, "padding", 0, _WHO),
        conv_pair(dilation, "dilation", 1, _WHO),
    )
