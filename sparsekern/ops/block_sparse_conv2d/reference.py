"""The plain-PyTorch reference twin of block_sparse_conv2d: ``F.conv2d`` with the dense weight
rebuilt from the tap-major view."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsekern.formats.block_sparse import BlockSparseMatrix
from sparsekern.ops.block_sparse_conv2d.layout import _geometry_of, conv_weight_from_gemm

__all__ = ["block_sparse_conv2d_reference"]


def block_sparse_conv2d_reference(x, weight: BlockSparseMatrix, weight_shape, bias=None,
                                  stride=1, padding=0, dilation=1) -> torch.Tensor:  # fmt: skip
    """``F.conv2d`` with the dense weight rebuilt from the tap-major ``weight``."""
    dense = conv_weight_from_gemm(weight.to_dense(), weight_shape, weight.block_size[1])
    return F.conv2d(x, dense, bias, *_geometry_of(stride, padding, dilation))
