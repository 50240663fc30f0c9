"""Sparse storage formats: ``BlockSparseMatrix`` (``block_sparse``: kept blocks only, what the
block-sparse kernels read), ``CSRMatrix`` (``csr``: kept entries with int16 column indices, what
unstructured masks export to), Han et al.'s relative-index storage (``relative_index``) and Deep
Compression's trained quantisation (``quantize``) and Huffman coding (``huffman``) on top of it."""

from sparsekern.formats.block_sparse import BlockSparseFormatError, BlockSparseMatrix
from sparsekern.formats.csr import CSRFormatError, CSRMatrix
from sparsekern.formats.quantize import QuantizedWeights
from sparsekern.formats.relative_index import (
    CompressedFormatError,
    format_storage,
    load_compressed,
    save_compressed,
)

__all__ = [
    "BlockSparseFormatError",
    "BlockSparseMatrix",
    "CSRFormatError",
    "CSRMatrix",
    "CompressedFormatError",
    "QuantizedWeights",
    "format_storage",
    "load_compressed",
    "save_compressed",
]
