"""The public block-sparse conv ops: ``block_masked_conv2d`` (dense weight, block-structured
mask: SparseConv2d's block mode) and ``block_sparse_conv2d`` (compact ``BlockSparseMatrix`` of
the tap-major view). Each checks its inputs, picks the path (Triton kernels, else
``masked_conv2d`` / the reference) and enters the autograd function of ``custom_ops``."""

from __future__ import annotations

import torch

from sparsekern.formats.block_sparse import BlockSparseMatrix, block_size_pair
from sparsekern.ops._checks import check_bias
from sparsekern.ops._conv import conv_out_size
from sparsekern.ops._dispatch import use_kernels
from sparsekern.ops._launch import KERNEL_DTYPES, autocast_to
from sparsekern.ops._mask_cache import masked_copy
from sparsekern.ops._mask_pass import zero_pruned
from sparsekern.ops._triton import require_triton
from sparsekern.ops.block_sparse_conv2d.custom_ops import _BlockSparseConvFunction
from sparsekern.ops.block_sparse_conv2d.kernels import nhwc
from sparsekern.ops.block_sparse_conv2d.layout import (
    _cdiv,
    _conv_meta,
    _geometry_of,
    cached_conv_layout_of_matrix,
    conv_layout_of_mask,
    conv_layout_of_matrix,
)
from sparsekern.ops.block_sparse_conv2d.reference import block_sparse_conv2d_reference
from sparsekern.ops.masked_conv2d import masked_conv2d

__all__ = ["block_masked_conv2d", "block_sparse_conv2d"]


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
    shape = (c_out, c_in, kh, kw)
    if torch.compiler.is_compiling():  # the cache reads version counters and data pointers
        lay = conv_layout_of_matrix(weight, shape)
    else:
        lay = cached_conv_layout_of_matrix(weight, shape)
    values = values if values.is_contiguous() else values.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _BlockSparseConvFunction.apply(
        x, values, bias, "compact", (c_out, c_in, kh, kw), geometry, *_conv_meta(lay)
    )
