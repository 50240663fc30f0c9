"""Masked 2-D convolution: ``y = conv2d(x, weight * mask) + bias`` with a weight gradient that is
exactly zero where ``mask`` is False.

REFERENCE-ONLY for now: every device runs plain PyTorch convolutions (``F.conv2d`` forward,
``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` backward). The Triton conv kernels come in a
later issue; they will slot in behind :func:`masked_conv2d` (same signature, same semantics)
through ``sparsekern.ops._dispatch`` like ``masked_linear`` does. Until then ``TRITON_INTERPRET``
has no effect here.

Shapes (PyTorch's): ``x [N, C_in, H, W]`` (or unbatched ``[C_in, H, W]``),
``weight [C_out, C_in / groups, kH, kW]``, ``mask`` bool of ``weight``'s shape, ``bias [C_out]``,
``y [N, C_out, H_out, W_out]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["masked_conv2d", "masked_conv2d_reference"]

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
    """The definition, in one line of PyTorch: ``F.conv2d(x, weight * mask, bias, ...)``.

    No validation and plain autograd (so its weight gradient is ``grad * mask``, which is zero at
    pruned entries only while the unmasked gradient is finite). Tests compare against it.
    """
    return F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)


class _MaskedConv2dFn(torch.autograd.Function):
    """Autograd for ``conv2d(x, weight * mask, bias)`` with explicit symmetric padding.

    Backward: ``dx = conv2d_input(dy, weight * mask)``; ``dweight = conv2d_weight(x, dy)`` with
    pruned entries set to zero (``where`` rather than ``* mask`` so that a NaN/inf in the raw
    gradient cannot leak into a pruned entry); ``dbias = dy.sum((0, 2, 3))``.
    """

    @staticmethod
    def forward(ctx, x, weight, mask, bias, stride, padding, dilation, groups):
        w = weight * mask  # [C_out, C_in/groups, kH, kW]; `* mask` keeps F.conv2d's semantics
        y = F.conv2d(x, w, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, w, mask)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable: fail loudly on double grad
    def backward(ctx, dy):
        x, w, mask = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = torch.nn.grad.conv2d_input(x.shape, w, dy, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            raw = torch.nn.grad.conv2d_weight(x, w.shape, dy, stride, padding, dilation, groups)
            dweight = torch.where(mask, raw, torch.zeros((), dtype=raw.dtype, device=raw.device))
        if ctx.has_bias and ctx.needs_input_grad[3]:
            dbias = dy.sum(dim=(0, 2, 3))
        return dx, dweight, None, dbias, None, None, None, None


def _fmt_shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    """``value`` as a pair of ints >= ``minimum``; raises naming expected vs got."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(
            f"masked_conv2d: expected {name} as an int or a pair of ints, got {value!r}"
        )
    if min(pair) < minimum:
        raise ValueError(f"masked_conv2d: expected {name} >= {minimum}, got {value!r}")
    return pair


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
    if bias is not None:
        if bias.shape != (c_out,):
            raise ValueError(
                f"masked_conv2d: expected bias of shape [{c_out}] (C_out), got {_fmt_shape(bias)}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(
                f"masked_conv2d: expected bias of weight's dtype {weight.dtype}, got {bias.dtype}"
            )


def _resolve_padding(
    padding, weight: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """Turn ``padding`` (int, pair, 'valid' or 'same') into symmetric ``(pH, pW)`` plus, for an
    asymmetric 'same', the extra ``F.pad`` amounts ``(left, right, top, bottom)`` to apply first.

    'same' pads ``dilation * (k - 1)`` in total per dimension, the smaller half before and the
    larger after, exactly as ``F.conv2d`` does; the autograd Function then only needs symmetric
    padding (what ``conv2d_input`` / ``conv2d_weight`` take).
    """
    if not isinstance(padding, str):
        return _pair(padding, "padding", 0), None
    if padding == "valid":
        return (0, 0), None
    if padding != "same":
        raise ValueError(
            f"masked_conv2d: expected padding as an int, a pair of ints, 'valid' or 'same', "
            f"got {padding!r}"
        )
    if stride != (1, 1):
        raise ValueError(
            f"masked_conv2d: padding='same' needs stride 1 (as in F.conv2d), got stride={stride}"
        )
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    before = [t // 2 for t in totals]
    after = [t - b for t, b in zip(totals, before)]
    if before == after:
        return (before[0], before[1]), None
    # Symmetric part inside the conv, the odd extra row/column padded explicitly after.
    extra_h, extra_w = after[0] - before[0], after[1] - before[1]
    return (before[0], before[1]), (0, extra_w, 0, extra_h)


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: _IntOrPair = 1,
    padding: _IntOrPair | str = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)``, autograd-aware,
    with ``dweight`` exactly zero where ``mask`` is False.

    Args:
        x: ``[N, C_in, H, W]`` or unbatched ``[C_in, H, W]``, floating point.
        weight: ``[C_out, C_in / groups, kH, kW]``, same dtype and device as ``x``.
        mask: ``torch.bool``, ``weight``'s shape and device; True keeps a weight.
        bias: ``[C_out]`` or None.
        stride, dilation: int or pair, >= 1.
        padding: int or pair (>= 0), or ``'valid'`` / ``'same'`` (``'same'`` needs stride 1).
        groups: int >= 1 dividing ``C_in`` and ``C_out``.

    Returns:
        ``[N, C_out, H_out, W_out]`` (``[C_out, H_out, W_out]`` for unbatched ``x``).

    Raises:
        TypeError / ValueError naming the expected and the received value for a wrong rank, shape,
        dtype, device or conv argument.
    """
    # Under autocast F.conv2d would run in the autocast dtype; cast explicitly here (recorded by
    # autograd, so gradients return to the original dtypes) and run the Function with autocast
    # off so that forward and backward see consistent dtypes.
    autocast_on = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    if autocast_on:
        dtype = torch.get_autocast_dtype(x.device.type)
        if x.is_floating_point():
            x = x.to(dtype)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            weight = weight.to(dtype)
        if isinstance(bias, torch.Tensor) and bias.is_floating_point():
            bias = bias.to(dtype)
    _check_inputs(x, weight, mask, bias, groups)
    stride2 = _pair(stride, "stride", 1)
    dilation2 = _pair(dilation, "dilation", 1)
    padding2, extra = _resolve_padding(padding, weight, stride2, dilation2)

    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if extra is not None:
        x = F.pad(x, extra)
    args = (x, weight, mask, bias, stride2, padding2, dilation2, groups)
    if autocast_on:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = _MaskedConv2dFn.apply(*args)
    else:
        y = _MaskedConv2dFn.apply(*args)
    return y.squeeze(0) if unbatched else y
