"""Layouts: which blocks of W are stored, for both storages (compact values, or a dense weight
with a block-structured mask)."""

from __future__ import annotations

import torch

from sparsekern.formats.block_sparse import BlockSparseMatrix, block_occupancy, block_size_pair
from sparsekern.ops._block_kernels import Layout, layout_from_occupancy
from sparsekern.ops._mask_cache import cached_on_mask

__all__ = ["layout_of_mask", "layout_of_matrix"]


def layout_of_matrix(w: BlockSparseMatrix) -> Layout:
    """The layout of a compact ``BlockSparseMatrix`` (block p at element ``p * bm * bk``)."""
    return Layout(
        w.shape, w.block_size, w.nnz_blocks, w.row_ptr, w.col_idx, w.block_row,
        w.col_ptr, w.t_row, w.t_perm, False, None,
    )  # fmt: skip


def _compute_mask_layout(mask: torch.Tensor, block: tuple[int, int]) -> Layout:
    occ = block_occupancy(mask, block)  # [R, C]
    full = block_occupancy(~mask, block).logical_not()  # blocks with no False at all
    whole_blocks = bool((full | ~occ).all())  # every block is either all kept or all pruned
    keep = None if whole_blocks else mask.view(torch.uint8)
    return layout_from_occupancy(occ, mask.shape, block, True, keep)


def layout_of_mask(mask: torch.Tensor, block_size) -> Layout:
    """The layout of a dense contiguous weight ``[N, K]`` whose kept blocks are those of ``mask``
    holding any True. Cached on the mask; recomputed only when the mask changes."""
    block = block_size_pair(block_size)
    return cached_on_mask(mask, f"bsr:{block}", lambda m: _compute_mask_layout(m, block))


def _compact_layout(values, meta, rows: int, cols: int) -> Layout:
    """The layout of compact ``values`` from the matrix's six metadata tensors (``row_ptr``,
    ``col_idx``, ``block_row``, ``col_ptr``, ``t_row``, ``t_perm``): nothing to compute, nothing
    to cache."""
    row_ptr, col_idx, block_row, col_ptr, t_row, t_perm = meta
    block = (values.shape[1], values.shape[2])
    return Layout(
        (rows, cols), block, values.shape[0], row_ptr, col_idx, block_row, col_ptr, t_row, t_perm,
        False, None,
    )  # fmt: skip
