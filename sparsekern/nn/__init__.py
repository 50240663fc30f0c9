"""Sparse modules (``SparseLinear``, ``SparseConv2d``, ``SparseMultiheadAttention``,
``SparseConv1D``), ``sparsify``, the mask invariant (``set_mask``, ``check_masks``), and the
inference export (``to_inference``: per layer dense, ``CSRLinear`` / ``CSRConv2d`` or
``BlockSparseLinear`` / ``BlockSparseConv2d``, whichever is fastest on the device)."""

from sparsekern.nn.compact import CompactSparseLinear
from sparsekern.nn.csr_layers import CSRConv2d, CSRLinear
from sparsekern.nn.execution_plan import PathChoice, PlanEntry, execution_plan
from sparsekern.nn.inference import (
    BlockSparseConv2d,
    BlockSparseLinear,
    LayerChoice,
    inference_choices,
    inference_plan,
    inference_report,
    load_inference,
    save_inference,
    to_inference,
)
from sparsekern.nn.masks import (
    apply_masks,
    check_masks,
    mask_every_gradient,
    mask_problems,
    set_mask,
    sync_optimizer,
    zero_optimizer_state,
)
from sparsekern.nn.sparse_attention import ParameterMask, SparseConv1D, SparseMultiheadAttention
from sparsekern.nn.sparse_conv2d import SparseConv2d
from sparsekern.nn.sparse_linear import SparseLinear
from sparsekern.nn.sparsify import HF_CONV1D, Coverage, coverage, sparse_modules, sparsify

__all__ = [
    "HF_CONV1D",
    "BlockSparseConv2d",
    "BlockSparseLinear",
    "CompactSparseLinear",
    "Coverage",
    "ParameterMask",
    "SparseConv1D",
    "CSRConv2d",
    "CSRLinear",
    "LayerChoice",
    "SparseConv2d",
    "SparseLinear",
    "SparseMultiheadAttention",
    "apply_masks",
    "check_masks",
    "coverage",
    "execution_plan",
    "PathChoice",
    "PlanEntry",
    "mask_every_gradient",
    "inference_choices",
    "inference_plan",
    "inference_report",
    "load_inference",
    "save_inference",
    "mask_problems",
    "set_mask",
    "sparse_modules",
    "sparsify",
    "sync_optimizer",
    "to_inference",
    "zero_optimizer_state",
]
