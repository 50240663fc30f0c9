"""Sparse modules (``SparseLinear``, ``SparseConv2d``), ``sparsify``, the mask invariant, and
block-sparse inference (``BlockSparseLinear``, ``to_inference``)."""

from sparsekern.nn.inference import BlockSparseConv2d, BlockSparseLinear, to_inference
from sparsekern.nn.masks import (
    apply_masks,
    check_masks,
    mask_problems,
    set_mask,
    zero_optimizer_state,
)
from sparsekern.nn.sparse_conv2d import SparseConv2d
from sparsekern.nn.sparse_linear import SparseLinear
from sparsekern.nn.sparsify import sparse_modules, sparsify

__all__ = [
    "BlockSparseConv2d",
    "BlockSparseLinear",
    "SparseConv2d",
    "SparseLinear",
    "apply_masks",
    "check_masks",
    "mask_problems",
    "set_mask",
    "sparse_modules",
    "sparsify",
    "to_inference",
    "zero_optimizer_state",
]
