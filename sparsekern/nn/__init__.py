"""Sparse modules (``SparseLinear``, ``SparseConv2d``), ``sparsify`` and the mask invariant."""

from sparsekern.nn.masks import apply_masks, set_mask, zero_optimizer_state
from sparsekern.nn.sparse_conv2d import SparseConv2d
from sparsekern.nn.sparse_linear import SparseLinear
from sparsekern.nn.sparsify import sparse_modules, sparsify

__all__ = [
    "SparseConv2d",
    "SparseLinear",
    "apply_masks",
    "set_mask",
    "sparse_modules",
    "sparsify",
    "zero_optimizer_state",
]
