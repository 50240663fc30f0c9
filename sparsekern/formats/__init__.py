"""Sparse storage formats: ``BlockSparseMatrix`` (``block_sparse``: kept blocks only, what the
block-sparse kernels read) and Han et al.'s relative-index storage (``relative_index``)."""

from sparsekern.formats.block_sparse import BlockSparseFormatError, BlockSparseMatrix
from sparsekern.formats.relative_index import (
    CompressedFormatError,
    load_compressed,
    save_compressed,
)

__all__ = [
    "BlockSparseFormatError",
    "BlockSparseMatrix",
    "CompressedFormatError",
    "load_compressed",
    "save_compressed",
]
