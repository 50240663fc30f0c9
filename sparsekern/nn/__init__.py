"""Sparse modules (``SparseLinear``, ``SparseConv2d``), ``sparsify``, the mask invariant, and
the inference export (``to_inference``: per layer dense, ``CSRLinear`` / ``CSRConv2d`` or
``BlockSparseLinear`` / ``BlockSparseConv2d``, whichever is fastest on the device)."""

from sparsekern.nn.csr_layers import CSRConv2d, CSRLinear
from sparsekern.nn.inference import (
    BlockSparseConv2d,
    BlockSparseLinear,
    LayerChoice,
    inference_choices,
    inference_plan,
    inference_report,
    load_inference,
    to_inference,
)
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
    "CSRConv2d",
    "CSRLinear",
    "LayerChoice",
    "SparseConv2d",
    "SparseLinear",
    "apply_masks",
    "check_masks",
    "inference_choices",
    "inference_plan",
    "inference_report",
    "load_inference",
    "mask_problems",
    "set_mask",
    "sparse_modules",
    "sparsify",
    "to_inference",
    "zero_optimizer_state",
]
