"""Sparse training for unstructured masks: forward, dX and dW on the kept weights only.

* :mod:`.index`: the CSR index of a mask (and of its transpose), cached on the mask.
"""

from sparsekern.ops.sparse_train.index import MaskIndex, build_index, mask_index

__all__ = ["MaskIndex", "build_index", "mask_index"]
