"""Functional ops, each autograd-aware: Triton kernels on CUDA tensors (and on CPU tensors under
``TRITON_INTERPRET=1``), the plain-PyTorch reference twin on CPU tensors otherwise."""

from sparsekern.ops.block_sparse_conv2d import block_masked_conv2d, block_sparse_conv2d
from sparsekern.ops.block_sparse_linear import (
    block_masked_linear,
    block_sparse_linear,
    block_sparse_linear_reference,
)
from sparsekern.ops.masked_conv2d import masked_conv2d, masked_conv2d_reference
from sparsekern.ops.masked_linear import masked_linear, masked_linear_reference

__all__ = [
    "block_masked_conv2d",
    "block_sparse_conv2d",
    "block_masked_linear",
    "block_sparse_linear",
    "block_sparse_linear_reference",
    "masked_conv2d",
    "masked_conv2d_reference",
    "masked_linear",
    "masked_linear_reference",
]
