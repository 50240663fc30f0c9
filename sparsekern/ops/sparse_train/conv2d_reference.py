"""The plain-PyTorch twin of :func:`sparsekern.ops.sparse_train.conv2d.sparse_conv2d`.

``y = F.conv2d(x, weight * mask, bias, stride, padding, dilation)``: its gradients are the
definition (``dweight`` is zero where ``mask`` is False because of the product) and it supports
double backward, so the sparse layer runs it under ``create_graph``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sparse_conv2d_reference"]


def sparse_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """``[N, C_in, H, W] -> [N, C_out, H_out, W_out]``, weight ``[C_out, C_in, kH, kW]``,
    ``mask`` bool of the weight's shape, ``bias [C_out]`` or None."""
    return F.conv2d(x, weight * mask, bias, stride, padding, dilation)
