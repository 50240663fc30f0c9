"""Sparse training for unstructured masks: forward, dX and dW on the kept weights only.

* :mod:`.index`: the CSR index of a mask (and of its transpose), cached on the mask.
* :mod:`.linear`: ``sparse_linear`` (dense-shaped weight) and ``sparse_linear_values``
  (the kept values as the trainable tensor), with the reference twin.
* :mod:`._kernels`: the products, on the C++/OpenMP extension (``../csrc``) or torch.sparse.
"""

from sparsekern.ops.sparse_train.index import MaskIndex, build_index, mask_index
from sparsekern.ops.sparse_train.linear import (
    gather_values,
    sparse_linear,
    sparse_linear_reference,
    sparse_linear_values,
)

__all__ = [
    "MaskIndex",
    "build_index",
    "gather_values",
    "mask_index",
    "sparse_linear",
    "sparse_linear_reference",
    "sparse_linear_values",
]
