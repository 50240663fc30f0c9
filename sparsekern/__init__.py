"""sparsekern: Triton kernels for sparse training and inference.

The pruning mask is fused into the GEMM kernels (forward, dX, dW), so a pruned layer costs no
extra passes over its weights. Public names (see ``shared/API.md``):

* ``sparsekern.ops``: ``masked_linear``, ``masked_conv2d`` (functional, autograd-aware)
* ``sparsekern.nn``: ``SparseLinear``, ``SparseConv2d``, ``sparsify``, ``set_mask``
* ``sparsekern.pruning``: Han et al.'s magnitude pruning and its lifecycle
* ``save_compressed`` / ``load_compressed``: Han's relative-index sparse storage
"""

from sparsekern.formats.relative_index import load_compressed, save_compressed
from sparsekern.nn import (
    SparseConv2d,
    SparseLinear,
    apply_masks,
    set_mask,
    sparse_modules,
    sparsify,
)

__version__ = "0.1.0"

__all__ = [
    "SparseConv2d",
    "SparseLinear",
    "apply_masks",
    "load_compressed",
    "save_compressed",
    "set_mask",
    "sparse_modules",
    "sparsify",
]
