"""masked_weight: ``where(mask, weight, 0)`` as an autograd value whose gradient is masked.

This is what lets a sparse layer run the vendor kernels (cuBLAS/cuDNN, MKL/oneDNN) for its forward,
dX and dW, and add only the mask: ``F.linear(x, masked_weight(w, m), b)`` computes
``x (W*M)^T + b``; the GEMM's weight gradient reaches this op's backward, which zeroes it at
pruned entries (one pass over a weight-sized tensor, ``sparsekern.ops._mask_pass``) before it is
accumulated into ``weight.grad``. So ``weight.grad`` (and ``torch.autograd.grad`` w.r.t. the
weight, and anything DDP all-reduces) is exactly zero where ``mask`` is False.

Two modes:

* ``assume_pruned_zero=False`` (default, exact for any weight): the forward value is
  ``where(mask, weight, 0)``, one pass over the weight. Where no weight gradient is needed
  (inference) it is cached on the mask until the weight or the mask changes (object, version
  counter or data pointer: ``_mask_cache.masked_copy``, one weight-sized tensor per mask); writes
  through ``weight.data`` bypass the version counter, and ``check_masks`` reports the stale copy
  they leave. With a weight gradient (training, gradcheck) it is computed on every call. A NaN or
  inf at a pruned entry is ignored, as pruned entries do not exist.
* ``assume_pruned_zero=True`` (the sparse modules, whose pruned weights are exactly zero by the
  mask invariant): the forward value is ``weight`` itself, no copy and no pass.

Layers: ``_MaskedWeightFunction`` (autograd) -> ``masked_weight`` (public). The reference twin is
``masked_weight_reference``: ``weight * mask`` by torch's autograd.
"""

from __future__ import annotations

import torch

from sparsekern.ops._mask_cache import masked_copy
from sparsekern.ops._mask_pass import zero_pruned, zero_pruned_

__all__ = ["check_mask", "masked_weight", "masked_weight_checked", "masked_weight_reference"]


class _MaskedWeightFunction(torch.autograd.Function):
    """``forward(weight, mask, value, inplace) -> value``; ``backward: g -> where(mask, g, 0)``.

    ``value`` is the masked copy of ``weight``, or None for ``weight`` itself. ``inplace``: the
    caller guarantees that the output feeds exactly one vendor op (F.linear, F.conv2d) whose
    weight gradient is a fresh tensor owned by the backward, so it may be masked in place (no
    weight-sized allocation, which for a 151 MB fp32 gradient costs ~10 ms of page faults on the
    CPU). The classic ``forward(ctx, ...)`` form:
    with a separate ``setup_context``, ``apply`` binds arguments through ``inspect.signature`` on
    every call."""

    @staticmethod
    def forward(ctx, weight, mask, value, inplace):
        ctx.save_for_backward(mask)
        ctx.inplace = inplace
        value = weight if value is None else value  # None: the weight itself (torch.compile
        return value.view_as(value)  # refuses the same tensor passed twice to a Function)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or not ctx.inplace:
            # create_graph (double backward), torch.compile (traceable) or a shared gradient: out
            # of place, differentiable
            return zero_pruned(grad, mask), None, None, None
        return zero_pruned_(grad, mask), None, None, None


class _MaskedWeightFuncFunction(torch.autograd.Function):
    """The same op for torch.func transforms (``grad``, ``vmap``, ``jacrev``: per-sample
    gradients), which need ``setup_context`` and a vmap rule. Out of place throughout: a batched
    gradient must not be written in place."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight, mask, value):
        value = weight if value is None else value
        return value.view_as(value)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return zero_pruned(grad, mask), None, None


def _functorch_active() -> bool:
    # What torch.autograd.Function.apply itself asks (no public equivalent in torch 2.11/2.14).
    return torch._C._are_functorch_transforms_active()


def masked_weight_reference(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: ``weight * mask``."""
    return weight * mask


def masked_weight(
    weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    assume_pruned_zero: bool = False,
    inplace_grad: bool = False,
) -> torch.Tensor:
    """``where(mask, weight, 0)`` whose gradient w.r.t. ``weight`` is exactly zero where ``mask`` is
    False. Feed it to any op that takes a weight: ``F.linear(x, masked_weight(w, m), b)``.

    Args:
        weight: any floating tensor, e.g. ``[out, in]`` or ``[out, in/groups, kh, kw]``.
        mask: ``torch.bool``, ``weight``'s shape and device; True keeps an entry.
        assume_pruned_zero: the caller guarantees ``weight`` is exactly 0 where ``mask`` is False
            (the sparse modules' invariant); the value is then ``weight`` itself, with no copy.
        inplace_grad: the result feeds exactly one op (``F.linear``, ``F.conv2d``) whose weight
            gradient is a fresh tensor, so the backward may mask it in place. Leave it False when
            the result is used more than once, or by an op that may pass its gradient through
            (``+``): the same gradient tensor then also reaches another input.
    Returns:
        A tensor of ``weight``'s shape and dtype. Without grad for ``weight`` it is ``weight`` or
        the cached masked copy, with no autograd node.
    """
    check_mask(mask, weight, "masked_weight")
    return masked_weight_checked(weight, mask, assume_pruned_zero, inplace_grad)


def masked_weight_checked(
    weight: torch.Tensor, mask: torch.Tensor, assume_pruned_zero: bool, inplace_grad: bool
) -> torch.Tensor:
    """:func:`masked_weight` for a ``mask`` its caller has already checked against ``weight``
    (``masked_linear``, ``masked_conv2d``): the check runs once per call, not twice."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return weight if assume_pruned_zero else masked_copy(weight, mask)
    # Training (or gradcheck, which perturbs inputs through .data, invisibly to version counters):
    # a fresh masked copy; the weight changes every step anyway, so a cache would not hit.
    if _functorch_active():
        value = None if assume_pruned_zero else zero_pruned(weight, mask).detach()
        return _MaskedWeightFuncFunction.apply(weight, mask, value)
    value = None if assume_pruned_zero else zero_pruned(weight.detach(), mask)
    return _MaskedWeightFunction.apply(weight, mask, value, inplace_grad)


def check_mask(mask, weight: torch.Tensor, who: str) -> None:
    """Raise unless ``mask`` is a ``torch.bool`` tensor of ``weight``'s shape and device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{who}: expected mask as a torch.bool Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{who}: expected mask of dtype torch.bool, got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(
            f"{who}: expected mask of the weight's shape {list(weight.shape)}, got "
            f"{list(mask.shape)}"
        )
    if mask.device != weight.device:
        raise ValueError(
            f"{who}: expected mask on the weight's device {weight.device}, got {mask.device}"
        )
