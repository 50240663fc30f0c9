"""masked_conv2d: ``y = conv2d(x, weight * mask) + bias`` whose weight gradient is exactly zero at
pruned weights.

Shapes (PyTorch's): ``x [N, C_in, H, W]`` (or unbatched ``[C_in, H, W]``),
``weight [C_out, C_in / groups, kH, kW]``, ``mask`` bool of ``weight``'s shape, ``bias [C_out]``,
``y [N, C_out, H_out, W_out]``.

Where it runs: ``F.conv2d`` and its standard backward (cuDNN on CUDA, oneDNN/MKL on the CPU) on
``where(mask, weight, 0)`` (``masked_weight``): forward, dX and dW are the vendor's, any layout
(NCHW or channels_last), groups, padding mode and dtype included. The mask adds one pass over the
weight-sized gradient (``_mask_pass``): 2.4 M weights for VGG-16's 512->512 3x3 convs, ~0.7 us per
1000 weights on a GPU against a conv step of milliseconds. For the sparse modules
(``assume_pruned_zero=True``, pruned weights exactly zero) the weight is used as it is: exactly
what ``nn.Conv2d`` runs, plus that pass.

Why no Triton conv kernel: an unstructured mask cannot skip work inside cuDNN's implicit GEMM,
and the fused implicit-GEMM kernels this file used to hold gathered NCHW patches with scalar,
unpipelined 2-byte loads and spilled 0.5-5.6 KB per thread at VGG-16 shapes on sm_90 (expected
0.1-0.25 of cuDNN). Block-sparse convs, which can skip work, live in ``block_sparse_conv2d``.

Layers: ``masked_weight`` (autograd of the mask) + ``F.conv2d`` (vendor) -> ``masked_conv2d``
(public: validation with errors naming expected vs got, autocast). The reference twin is
``masked_conv2d_reference``: ``F.conv2d(x, weight * mask, ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sparsekern.ops._checks import check_bias
from sparsekern.ops._conv import conv_out_size, conv_pair, resolve_padding
from sparsekern.ops._launch import autocast_to
from sparsekern.ops._mask_pass import zero_pruned
from sparsekern.ops.masked_weight import masked_weight_checked

__all__ = ["masked_conv2d", "masked_conv2d_reference", "masked_conv2d_trusted"]

_IntOrPair = int | Sequence[int]


def masked_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: _IntOrPair = 1,
    padding: _IntOrPair | str = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """The definition, in one line of PyTorch: ``F.conv2d(x, weight * mask, bias, ...)``."""
    return F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)


def _fmt_shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _fmt_shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _check_inputs(x, weight, mask, bias, groups) -> None:
    """Raise a clear error (expected vs got) for anything F.conv2d would reject obscurely."""
    for name, t in (("x", x), ("weight", weight), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"masked_conv2d: expected {name} to be a Tensor, got {type(t).__name__}"
            )
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(
            f"masked_conv2d: expected bias to be a Tensor or None, got {type(bias).__name__}"
        )
    if not x.is_floating_point():
        raise TypeError(f"masked_conv2d: expected a floating-point x, got dtype {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(
            f"masked_conv2d: expected a floating-point weight, got dtype {weight.dtype}"
        )
    if x.dim() not in (3, 4):
        raise ValueError(
            "masked_conv2d: expected x of rank 4 [N, C_in, H, W] or 3 [C_in, H, W], "
            f"got rank {x.dim()} with shape {_fmt_shape(x)}"
        )
    if weight.dim() != 4:
        raise ValueError(
            "masked_conv2d: expected weight of rank 4 [C_out, C_in/groups, kH, kW], "
            f"got rank {weight.dim()} with shape {_fmt_shape(weight)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"masked_conv2d: expected mask of dtype torch.bool, got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(
            f"masked_conv2d: expected mask of weight's shape {_fmt_shape(weight)}, "
            f"got {_fmt_shape(mask)}"
        )
    tensors = [("x", x), ("mask", mask)] + ([("bias", bias)] if bias is not None else [])
    for name, t in tensors:
        if t.device != weight.device:
            raise ValueError(
                f"masked_conv2d: expected {name} on weight's device {weight.device}, got {t.device}"
            )
    if x.dtype != weight.dtype:
        raise TypeError(
            f"masked_conv2d: expected x of weight's dtype {weight.dtype}, got {x.dtype}"
        )
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"masked_conv2d: expected groups as an int >= 1, got {groups!r}")
    c_out, c_in_per_group = weight.shape[0], weight.shape[1]
    if c_out % groups != 0:
        raise ValueError(
            f"masked_conv2d: expected weight.shape[0] (C_out) divisible by groups={groups}, "
            f"got {c_out}"
        )
    c_in = x.shape[-3]
    if c_in != c_in_per_group * groups:
        raise ValueError(
            f"masked_conv2d: expected x with C_in = weight.shape[1] * groups = "
            f"{c_in_per_group} * {groups} = {c_in_per_group * groups} channels, got {c_in} "
            f"(x shape {_fmt_shape(x)})"
        )
    check_bias("masked_conv2d", bias, c_out, weight, dim="C_out")  # device checked above


def _check_output_size(padded, weight, stride, dilation) -> None:
    KH, KW = weight.shape[-2:]
    out = [conv_out_size(*a, 0, d) for a, d in zip(zip(padded, (KH, KW), stride), dilation)]
    if min(out) < 1:
        span = [d * (k - 1) + 1 for d, k in zip(dilation, (KH, KW))]
        raise ValueError(
            f"masked_conv2d: expected a padded input of at least the dilated kernel's size "
            f"{span[0]}x{span[1]}, got {padded[0]}x{padded[1]}: the output would be "
            f"{out[0]}x{out[1]}"
        )


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: _IntOrPair = 1,
    padding: _IntOrPair | str = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
    *,
    assume_pruned_zero: bool = False,
) -> torch.Tensor:
    """``F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)``, autograd-aware,
    with ``dweight`` exactly zero where ``mask`` is False.

    Args:
        x: ``[N, C_in, H, W]`` or unbatched ``[C_in, H, W]``, floating point, any memory format.
        weight: ``[C_out, C_in / groups, kH, kW]``, same dtype and device as ``x``.
        mask: ``torch.bool``, ``weight``'s shape and device; True keeps a weight.
        bias: ``[C_out]`` or None.
        stride, dilation: int or pair, >= 1.
        padding: int or pair (>= 0), or ``'valid'`` / ``'same'`` (``'same'`` needs stride 1).
        groups: int >= 1 dividing ``C_in`` and ``C_out``.
        assume_pruned_zero: the caller guarantees ``weight`` is exactly 0 where ``mask`` is False
            (the sparse modules' invariant): the conv then uses ``weight`` as it is.

    Returns:
        ``[N, C_out, H_out, W_out]`` (``[C_out, H_out, W_out]`` for unbatched ``x``). Pruned
        entries are ignored, NaN or inf included (``where`` semantics). Double backward works.

    Raises:
        TypeError / ValueError naming the expected and the received value for a wrong rank, shape,
        dtype, device or conv argument.
    """
    x, weight, bias = autocast_to(x, weight, bias)
    _check_inputs(x, weight, mask, bias, groups)
    stride2 = conv_pair(stride, "stride", 1)
    dilation2 = conv_pair(dilation, "dilation", 1)
    padding2, extra = resolve_padding(padding, weight, stride2, dilation2)
    if extra is None:
        padded = (x.shape[-2] + 2 * padding2[0], x.shape[-1] + 2 * padding2[1])
    else:
        padded = (
            x.shape[-2] + 2 * padding2[0] + extra[3],
            x.shape[-1] + 2 * padding2[1] + extra[1],
        )
    _check_output_size(padded, weight, stride2, dilation2)
    needs_dw = torch.is_grad_enabled() and weight.requires_grad
    if torch.compiler.is_compiling() and not assume_pruned_zero:
        w = zero_pruned(weight, mask)  # the masked-copy cache is not traceable
    else:
        w = masked_weight_checked(weight, mask, assume_pruned_zero, needs_dw)
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


def masked_conv2d_trusted(x, weight, mask, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """:func:`masked_conv2d` with ``assume_pruned_zero=True`` for a caller that owns ``weight``,
    ``mask`` and ``bias`` and has checked them (``SparseConv2d``: the mask is checked against the
    weight whenever it changes); ``x`` and the conv arguments are checked by ``F.conv2d``, as
    ``nn.Conv2d``'s are, and autocast is ``F.conv2d``'s own. Same values and gradients, without
    the public op's per-call checks and padding resolution."""
    needs_dw = torch.is_grad_enabled() and weight.requires_grad
    w = masked_weight_checked(weight, mask, True, needs_dw) if needs_dw else weight
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)
