"""Sparse storage formats: ``BlockSparseMatrix`` (``block_sparse``: kept blocks only, what the
block-sparse kernels read), ``CSRMatrix`` (``csr``: kept entries with int16 column indices, what
unstructured masks export to) and Han et al.'s relative-index storage (``relative_index``)."""

from sparsekern.formats.block_sparse import BlockSparseFormatError, BlockSparseMatrix
from sparsekern.formats.csr import CSRFormatError, CSRMatrix
from sparsekern.formats.relative_index import (
    CompressedFormatError,
    load_compressed,
    save_compressed,
)

__all__ = [
    "BlockSparseFormatError",
    "BlockSparseMatrix",
    "CSRFormatError",
    "CSRMatrix",
    "CompressedFormatError",
    "load_compressed",
    "save_compressed",
]
