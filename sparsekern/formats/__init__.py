"""Sparse storage formats: Han et al.'s relative-index storage (``relative_index``)."""

from sparsekern.formats.relative_index import (
    CompressedFormatError,
    load_compressed,
    save_compressed,
)

__all__ = ["CompressedFormatError", "load_compressed", "save_compressed"]
