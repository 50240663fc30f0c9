"""sparsekern: Triton kernels for sparse training and inference.

The pruning mask is fused into the GEMM kernels (forward, dX, dW), so a pruned layer costs no
extra passes over its weights. Public names (see ``shared/API.md``):

* ``sparsekern.ops``: ``masked_linear``, ``masked_conv2d``, ``block_sparse_linear``,
  ``block_masked_linear`` (functional, autograd-aware)
* ``BlockSparseMatrix``: a matrix stored as its kept blocks (``sparsekern.formats.block_sparse``)
* ``sparsekern.nn``: ``SparseLinear`` (``block_size=`` for the block kernels), ``SparseConv2d``,
  ``sparsify``, ``set_mask``, ``BlockSparseLinear`` and ``to_inference`` (export)
* ``sparsekern.pruning``: Han et al.'s magnitude pruning and its lifecycle
* ``save_compressed`` / ``load_compressed``: Han's relative-index sparse storage
"""

from sparsekern.formats.block_sparse import BlockSparseMatrix
from sparsekern.formats.relative_index import load_compressed, save_compressed
from sparsekern.nn import (
    BlockSparseLinear,
    SparseConv2d,
    SparseLinear,
    apply_masks,
    set_mask,
    sparse_modules,
    sparsify,
    to_inference,
)

__version__ = "0.1.0"

__all__ = [
    "BlockSparseLinear",
    "BlockSparseMatrix",
    "SparseConv2d",
    "SparseLinear",
    "apply_masks",
    "load_compressed",
    "save_compressed",
    "set_mask",
    "sparse_modules",
    "sparsify",
    "to_inference",
]
