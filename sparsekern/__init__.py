"""sparsekern: sparse training and sparse inference for PyTorch, with Triton kernels where they
can beat the vendor libraries.

The rule: a sparse layer never costs more than its dense twin with the same weights, and pays
where a format or kernel can skip the zeros. Pruned weights are exactly zero (the mask invariant),
so a sparse module's forward and dX run the vendor kernels on the weight; the mask goes into dW
only. Block-sparse layers skip pruned blocks in Triton kernels. Public names (see
``shared/API.md``):

* ``sparsekern.ops``: ``masked_linear``, ``masked_conv2d``, ``masked_weight``,
  ``block_sparse_linear``, ``block_masked_linear``, ``block_sparse_conv2d``,
  ``block_masked_conv2d`` (functional, autograd-aware)
* ``BlockSparseMatrix``: a matrix stored as its kept blocks (``sparsekern.formats.block_sparse``);
  ``CSRMatrix``: its kept entries, int16 column indices (``sparsekern.formats.csr``)
* ``sparsekern.nn``: ``SparseLinear`` (``block_size=`` for the block kernels), ``SparseConv2d``,
  ``sparsify``, ``set_mask``, ``check_masks``, ``BlockSparseLinear`` and ``to_inference`` (per
  layer the fastest of dense, CSR and BSR on the layer's device)
* ``sparsekern.pruning``: Han et al.'s magnitude pruning and its lifecycle
* ``save_compressed`` / ``load_compressed``: Han's relative-index sparse storage, with Deep
  Compression's quantisation and Huffman coding (``QuantizedWeights``, ``format_storage``)
"""

from sparsekern.formats.block_sparse import BlockSparseMatrix
from sparsekern.formats.csr import CSRMatrix
from sparsekern.formats.quantize import QuantizedWeights
from sparsekern.formats.relative_index import format_storage, load_compressed, save_compressed
from sparsekern.nn import (
    BlockSparseLinear,
    SparseConv2d,
    SparseLinear,
    apply_masks,
    check_masks,
    set_mask,
    sparse_modules,
    sparsify,
    to_inference,
)

__version__ = "0.1.0"

__all__ = [
    "BlockSparseLinear",
    "BlockSparseMatrix",
    "CSRMatrix",
    "QuantizedWeights",
    "SparseConv2d",
    "SparseLinear",
    "apply_masks",
    "check_masks",
    "format_storage",
    "load_compressed",
    "save_compressed",
    "set_mask",
    "sparse_modules",
    "sparsify",
    "to_inference",
]
