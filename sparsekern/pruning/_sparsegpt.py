"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS error compensation, for one
weight matrix ``W [rows, cols]`` given the Gram matrix of its inputs.

Private to :mod:`sparsekern.pruning.one_shot`; the public entry point is
:func:`sparsekern.pruning.one_shot`.

The algorithm (the paper's Algorithm 1):

* ``H = 2 X^T X / n`` over the calibration inputs ``X [n, cols]``; inputs that were always zero
  (``H_ii = 0``) get ``H_ii = 1`` and their weights are pruned first (``W[:, i] = 0``, they cannot
  matter); dampening ``lambda = percdamp * mean(diag H)`` is added to the diagonal.
* ``U = cholesky(H^-1)``, upper: row ``j`` of ``U`` is row ``j`` of ``inv(H[j:, j:])`` divided by
  the square root of its diagonal entry, so one sweep over the columns applies every OBS update
  ``W[:, j:] -= (w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_{j, :}`` without re-inverting.
* Columns are processed in blocks of ``block_size`` (128): updates inside a block are applied
  eagerly, those to the later columns lazily, as one GEMM per block.
* Adaptive mask selection: at the start of every block, the weights of the block with the
  smallest ``w^2 / U_cc^2`` (the OBS error of removing them) are pruned, at the target sparsity:
  the same count in each row of the block (``selection="row"``, the default: each row loses
  exactly ``round(sparsity * cols)``), or one threshold over the whole ``[rows, block_size]`` block
  (``selection="block"``, as the reference code does; rows may end at different densities, the
  layer at exactly ``round(sparsity * rows * cols)`` by cumulative rounding). N:M: at the
  start of every group of M columns, each row keeps the N with the largest ``w^2 / U_cc^2`` (a
  last, shorter group of ``r`` keeps ``min(N, r)``).
* ``compensate=False`` keeps the mask selection but skips every weight update (the ablation
  "SparseGPT without the error-compensation update").
"""

from __future__ import annotations

import torch

__all__ = ["prepare_hessian", "sparsegpt_prune", "upper_cholesky_inverse"]


def prepare_hessian(
    W: torch.Tensor, H: torch.Tensor, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dead inputs and dampening, on copies: returns ``(W, H, dead)`` where ``dead`` (bool
    ``[cols]``) marks the inputs with ``H_ii == 0``; ``W[:, dead] = 0``, ``H[dead, dead] = 1``
    and ``H += percdamp * mean(diag H) * I``."""
    W = W.clone()
    H = H.clone()
    dead = torch.diagonal(H) == 0
    idx = torch.nonzero(dead).flatten()
    H[idx, idx] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diagonal(H))
    H.diagonal().add_(damp)
    return W, H, dead


def upper_cholesky_inverse(H: torch.Tensor) -> torch.Tensor:
    """``U`` upper triangular with ``U^T U = H^-1`` (``H`` symmetric positive definite)."""
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def _row_prune_counts(cols: int, sparsity: float, i1: int, i2: int) -> int:
    """How many weights per row to prune in columns ``[i1, i2)``: cumulative rounding, so the
    blocks of a row add up to exactly ``round(sparsity * cols)``."""
    return round(sparsity * i2) - round(sparsity * i1)


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    compensate: bool = True,
    selection: str = "row",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W [rows, cols]`` with SparseGPT.

    Args:
        W: the weight, ``[rows, cols]`` (rows: outputs; cols: inputs, the GEMM's reduction
            dimension); computed in ``H``'s dtype (float64 on CPU, float32 on GPU is enough).
        H: ``2 X^T X / n``, ``[cols, cols]``, symmetric.
        sparsity: pruned fraction (unstructured); ignored when ``n_m`` is given.
        n_m: ``(n, m)``: keep N of every M consecutive columns in each row.
        block_size: the lazy-update block (128 in the paper); with N:M it is rounded down to a
            multiple of M.
        percdamp: dampening, as a fraction of ``mean(diag H)``.
        compensate: False: select masks the same way but never update the kept weights.
        selection: unstructured only: ``"row"`` (default) prunes the same count in every row of
            a block (every row ends at exactly ``round(sparsity * cols)``); ``"block"`` takes one
            threshold over the whole ``[rows, block_size]`` block, as the reference code does
            (rows may differ; the layer ends at exactly ``round(sparsity * rows * cols)``).

    Returns:
        ``(W', keep)``: the reconstructed weight (zero where pruned), ``H``'s dtype; the bool mask
        (True keeps).
    """
    rows, cols = W.shape
    if selection not in ("row", "block"):
        raise ValueError(f"sparsegpt_prune: expected selection 'row' or 'block', got {selection!r}")
    if H.shape != (cols, cols):
        raise ValueError(
            f"sparsegpt_prune: expected H of shape [{cols}, {cols}], got {list(H.shape)}"
        )
    W = W.to(H.dtype)
    W, H, dead = prepare_hessian(W, H, percdamp)
    W = W.contiguous()
    U = upper_cholesky_inverse(H)
    if n_m is not None:
        n, m = n_m
        block_size = max(m, (block_size // m) * m)
    prune = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)  # True: pruned
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        mask1 = torch.zeros(rows, count, dtype=torch.bool, device=W.device)
        if n_m is None and selection == "row":
            k = _row_prune_counts(cols, sparsity, i1, i2)
            if k > 0:
                score = W1**2 / d.unsqueeze(0) ** 2
                idx = torch.topk(score, k, dim=1, largest=False).indices
                mask1.scatter_(1, idx, True)
        elif n_m is None:
            k = _row_prune_counts(rows * cols, sparsity, rows * i1, rows * i2)
            if k > 0:
                score = (W1**2 / d.unsqueeze(0) ** 2).flatten()
                idx = torch.topk(score, k, largest=False).indices
                mask1.view(-1)[idx] = True
        for i in range(count):
            if n_m is not None and i % m == 0:
                r = min(m, count - i)
                drop = r - min(n, r)
                if drop > 0:
                    score = W1[:, i : i + r] ** 2 / d[i : i + r].unsqueeze(0) ** 2
                    idx = torch.topk(score, drop, dim=1, largest=False).indices
                    mask1.scatter_(1, i + idx, True)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            if compensate:
                err = (w - q) / U1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
                Err1[:, i] = err
        W[:, i1:i2] = Q1
        prune[:, i1:i2] = mask1
        if compensate and i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    keep = ~prune
    W[~keep] = 0
    return W, keep
