"""The checks the sparse ops and inference layers share: a bias against its layer, and the one
semantics of non-finite values on the sparse paths.

Non-finite values (``shared/API.md``: where-semantics everywhere):

* a pruned weight contributes nothing, whatever it holds: formats store ``where(mask, w, 0)``
  (an inf at a pruned entry is not turned into NaN by ``inf * 0``), and the masked ops never read
  it;
* a non-finite *input* value behaves as in the dense product with the pruned weights at zero, the
  model the export came from (``SparseLinear`` runs the vendor GEMM on that weight, where
  ``0 * NaN = NaN``): every output that the dense product reaches is non-finite. For a linear
  layer that is the whole output row of an input row holding a NaN or inf; for a conv, every
  output channel at each position whose receptive field holds one. A sparse product skips the
  pruned weights, so it would leave some of those outputs finite; :func:`nonfinite_rows` and
  :func:`nonfinite_conv` set them to NaN (values: NaN there, or the ±inf the sparse product
  found; the dense product may give ±inf or NaN at a position: both are non-finite).

Cost: on the CPU one reduction over the input (about 1 us at batch 1; the fix-up only when it is
not finite); on other devices three small sync-free ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["check_bias", "nonfinite_conv", "nonfinite_rows"]


def check_bias(
    who: str, bias, out: int, like: torch.Tensor | None = None, dim: str | None = None
) -> None:
    """Raise unless ``bias`` is None or a tensor of shape ``[out]`` (and, with ``like``, of its
    dtype and device), naming expected vs got; ``dim`` names ``out`` in the message (``C_out``)."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out,):
        got = list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        named = f" ({dim})" if dim else ""
        raise ValueError(f"{who}: expected bias of shape [{out}]{named}, got {got}")
    if like is not None and (bias.dtype != like.dtype or bias.device != like.device):
        raise TypeError(
            f"{who}: expected bias as {like.dtype} on {like.device}, got {bias.dtype} on "
            f"{bias.device}"
        )


def _maybe_nonfinite(x: torch.Tensor) -> bool:
    """False when ``x`` is surely all finite. On the CPU one sum (an overflow of finite values
    only sends the exact check below); elsewhere True (the fix-up is sync-free)."""
    if x.is_cpu and not torch.compiler.is_compiling():
        return not math.isfinite(float(x.detach().sum())) if x.numel() else False
    return True


def nonfinite_rows(x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """``y2 [rows, out]`` (a sparse product of ``x2 [rows, in]``) with every output of a row
    whose input holds a non-finite value non-finite, as in the dense product (module
    docstring)."""
    if x2.numel() == 0 or not _maybe_nonfinite(x2):
        return y2
    bad = ~torch.isfinite(x2).all(dim=-1, keepdim=True)
    return y2.masked_fill(bad & torch.isfinite(y2), math.nan)


def nonfinite_conv(
    x: torch.Tensor, y: torch.Tensor, kernel_size, stride, padding, dilation
) -> torch.Tensor:
    """``y [N, C_out, OH, OW]`` (a sparse conv of ``x [N, C_in, H, W]``, already padded by any
    non-zero padding mode) with every output channel non-finite at each position whose receptive
    field holds a non-finite input, as in the dense conv (module docstring)."""
    if x.numel() == 0 or not _maybe_nonfinite(x):
        return y
    bad = (~torch.isfinite(x)).any(dim=1, keepdim=True).to(y.dtype)
    ones = torch.ones(1, 1, *kernel_size, dtype=y.dtype, device=y.device)
    reach = F.conv2d(bad, ones, None, stride, padding, dilation) > 0
    return y.masked_fill(reach & torch.isfinite(y), math.nan)
