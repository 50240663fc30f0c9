"""Functional ops, each autograd-aware, each with a plain-PyTorch reference twin.

* ``masked_linear``, ``masked_conv2d``: the vendor GEMM/conv (cuBLAS/cuDNN, MKL/oneDNN) on
  ``where(mask, weight, 0)``, and a weight gradient that is exactly zero where the mask is False
  (``masked_linear``'s dW has a fused Triton kernel for masks with whole pruned tiles).
* ``masked_weight``: the masked weight as an autograd value, for any other op that takes a weight.
* ``block_sparse_linear``, ``block_masked_linear``, ``block_sparse_conv2d``,
  ``block_masked_conv2d``: Triton kernels that visit only the stored blocks (CUDA, or the CPU
  under ``TRITON_INTERPRET=1``; the vendor path elsewhere).

triton is optional: without it everything runs except the Triton kernels, which raise
``TritonUnavailable`` with the reason.
"""

from sparsekern.ops._triton import HAS_TRITON, TritonUnavailable
from sparsekern.ops.block_sparse_conv2d import block_masked_conv2d, block_sparse_conv2d
from sparsekern.ops.block_sparse_linear import (
    block_masked_linear,
    block_sparse_linear,
    block_sparse_linear_reference,
)
from sparsekern.ops.masked_conv2d import masked_conv2d, masked_conv2d_reference
from sparsekern.ops.masked_linear import dw_backend, masked_linear, masked_linear_reference
from sparsekern.ops.masked_weight import masked_weight, masked_weight_reference

__all__ = [
    "HAS_TRITON",
    "TritonUnavailable",
    "block_masked_conv2d",
    "block_masked_linear",
    "block_sparse_conv2d",
    "block_sparse_linear",
    "block_sparse_linear_reference",
    "dw_backend",
    "masked_conv2d",
    "masked_conv2d_reference",
    "masked_linear",
    "masked_linear_reference",
    "masked_weight",
    "masked_weight_reference",
]
