"""The three sparse products of a linear training step, on the C++ extension or torch.sparse.

All take activations TRANSPOSED, batch contiguous (``X^T [K, M]``, ``dY^T [N, M]``), the
layout both backends want, and fp32 or fp64 operands (callers upcast fp16/bf16: the products
accumulate in fp32).

* :func:`spmm` ``(rp, ci, values, B [C, M]) -> [R, M]``: CSR ``[R, C]`` times ``B``;
* :func:`sddmm` ``(rp, ci, A [R, M], B [C, M]) -> [nnz]``: ``dot(A[r], B[c])`` at each kept
  ``(r, c)``;
* :func:`scatter_dense` / :func:`gather_dense`: kept values <-> a dense weight-sized tensor.

Backends (:func:`backend`): ``"cpp"``, ``csrc/sparse_linear.cpp`` (AVX-512 where the CPU has
it, OpenMP over rows), built on first use by ``sparsekern.ops._ext``; ``"torch"``, torch.sparse
CSR (MKL on CPU: ``csr @ dense`` and ``torch.sparse.sampled_addmm``), for fp64, non-CPU tensors,
and wherever the extension cannot be built (one warning) or ``SPARSEKERN_NO_EXT=1`` is set.
"""

from __future__ import annotations

import warnings

import torch

from sparsekern.ops import _fresh

__all__ = ["backend", "gather_dense", "scatter_dense", "sddmm", "spmm"]


def _ext():
    return _fresh.ext()  # the one build of csrc/sparse_linear.cpp


def backend(t: torch.Tensor) -> str:
    """``"cpp"`` when the extension runs for tensors like ``t`` (CPU fp32), else ``"torch"``."""
    if t.device.type == "cpu" and t.dtype == torch.float32 and _ext() is not None:
        return "cpp"
    return "torch"


def _csr(rp, ci, values, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta state"
        return torch.sparse_csr_tensor(rp, ci, values, shape, check_invariants=False)


def spmm(rp: torch.Tensor, ci: torch.Tensor, values: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``CSR(rp, ci, values) [R, C] @ b [C, M] -> [R, M]`` (contiguous)."""
    r = rp.numel() - 1
    if backend(b) == "cpp":
        out = torch.empty(r, b.shape[1], dtype=b.dtype, device=b.device)
        return _ext().spmm(rp, ci, values.contiguous(), b.contiguous(), out)
    return (_csr(rp, ci, values, (r, b.shape[0])) @ b).contiguous()


def sddmm(rp: torch.Tensor, ci: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[nnz]``: ``dot(a[r], b[c])`` at each entry ``(r, c)`` of the CSR pattern."""
    if backend(a) == "cpp":
        out = torch.empty(ci.numel(), dtype=a.dtype, device=a.device)
        return _ext().sddmm(rp, ci, a.contiguous(), b.contiguous(), out)
    pattern = _csr(rp, ci, a.new_zeros(ci.numel()), (a.shape[0], b.shape[0]))
    return torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values()


def scatter_dense(flat_idx: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
    """A fresh ``[numel]`` tensor: ``values`` at ``flat_idx``, exactly 0 elsewhere."""
    if backend(values) == "cpp":
        if numel >= _fresh.FRESH_MIN:  # a pooled huge-page mapping (sparsekern.ops._fresh)
            return _ext().scatter_fresh(flat_idx, values.contiguous(), numel)
        out = torch.empty(numel, dtype=values.dtype, device=values.device)
        return _ext().scatter_dense(flat_idx, values.contiguous(), out)
    out = values.new_zeros(numel)
    out[flat_idx] = values
    return out


def gather_dense(flat_idx: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``dense.reshape(-1)[flat_idx]`` (a fresh tensor)."""
    flat = dense.reshape(-1)
    if backend(flat) == "cpp":
        out = torch.empty(flat_idx.numel(), dtype=flat.dtype, device=flat.device)
        return _ext().gather_dense(flat_idx, flat.contiguous(), out)
    return flat[flat_idx]
