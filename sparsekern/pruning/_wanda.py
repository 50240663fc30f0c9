"""Wanda (Sun et al. 2023) and magnitude masks for one weight matrix ``W [rows, cols]``; private to
:mod:`sparsekern.pruning.one_shot`.

* Wanda: score ``|W_ij| * ||X_j||_2`` (the norm of input feature ``j`` over all calibration
  tokens); compared within each output row: every row loses exactly ``round(sparsity * cols)``
  weights; N:M within each group of M columns of a row. The kept weights are not changed.
* Magnitude: ``|W|``; unstructured with one threshold per layer (the ``round(sparsity * numel)``
  smallest of the whole layer are pruned, rows may differ); N:M by ``|w|`` per group.

N:M groups run along the columns (the input dimension); a last, shorter group of ``r`` columns
keeps ``min(N, r)``, as :func:`sparsekern.pruning.nm_mask` does.
"""

from __future__ import annotations

import torch

__all__ = ["magnitude_layer_mask", "nm_keep", "row_keep", "wanda_mask"]


def row_keep(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask pruning the ``round(sparsity * cols)`` lowest scores of every row."""
    rows, cols = score.shape
    k = round(sparsity * cols)
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(score, k, dim=1, largest=False).indices
        keep.scatter_(1, idx, False)
    return keep


def nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with the N largest scores of every group of M consecutive columns of a row
    (a last group of ``r < M`` keeps ``min(N, r)``)."""
    rows, cols = score.shape
    pad = (-cols) % m
    s = score
    if pad:
        s = torch.cat([s, s.new_full((rows, pad), -1.0)], dim=1)  # padding is never preferred
    g = s.view(rows, -1, m)
    idx = torch.topk(g, n, dim=-1).indices
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.view(rows, -1)[:, :cols].contiguous()


def wanda_mask(
    W: torch.Tensor, col_norm: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None
) -> torch.Tensor:
    """Wanda's keep mask for ``W [rows, cols]`` given ``col_norm [cols]`` (``||X_j||_2``)."""
    score = W.abs() * col_norm.to(W.dtype).unsqueeze(0)
    if n_m is not None:
        return nm_keep(score, *n_m)
    return row_keep(score, sparsity)


def magnitude_layer_mask(
    W: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None
) -> torch.Tensor:
    """Magnitude keep mask: per-layer threshold (unstructured) or N:M by ``|w|``."""
    score = W.abs()
    if n_m is not None:
        return nm_keep(score, *n_m)
    k = round(sparsity * score.numel())
    keep = torch.ones(score.numel(), dtype=torch.bool, device=W.device)
    if k > 0:
        idx = torch.topk(score.flatten(), k, largest=False).indices
        keep[idx] = False
    return keep.view_as(score)
