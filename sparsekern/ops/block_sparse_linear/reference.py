"""The plain-PyTorch reference twin of block_sparse_linear: ``F.linear`` on the densified
matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsekern.formats.block_sparse import BlockSparseMatrix

__all__ = ["block_sparse_linear_reference"]


def block_sparse_linear_reference(
    x: torch.Tensor, weight: BlockSparseMatrix, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain PyTorch: ``F.linear(x, weight.to_dense(), bias)``; differentiable w.r.t. ``x``,
    ``weight.values`` (stored blocks only: ``to_dense`` scatters them) and ``bias``."""
    return F.linear(x, weight.to_dense(), bias)
