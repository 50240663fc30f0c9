"""sparse_linear: ``y = x (W*M)^T + b`` whose forward, dX and dW read the kept weights only.

Shapes: ``x [..., K]``, weight ``[N, K]`` (or its kept values ``[nnz]``), mask bool ``[N, K]``,
``y [..., N]``; ``M`` below is the number of rows of ``x`` (the product of its leading dims).

* forward: ``Y^T = W_csr X^T`` (sparse x dense, ``2 nnz M`` FLOPs);
* dX:      ``dX^T = (W^T)_csr dY^T`` (the CSR of ``W^T``: ``MaskIndex.t_*``);
* dW:      ``dW[n, k] = dot(dY^T[n], X^T[k])`` at the kept ``(n, k)`` only (SDDMM). No dense
  weight gradient is ever computed by a GEMM.

Two entry points:

* :func:`sparse_linear_values` ``(x, values [nnz], index, bias)``: the trainable tensor is the
  kept values (compact storage): its gradient is ``[nnz]`` too.
* :func:`sparse_linear` ``(x, weight [N, K], mask, bias)``: dense storage; the kept values are
  gathered from the weight per call (``nnz`` reads), and ``weight.grad`` comes back as a dense
  ``[N, K]`` tensor, exactly zero at pruned entries: the values scattered into a zeroed pooled
  mapping (``_kernels.scatter_dense``, ``sparsekern.ops._fresh``; 22 ms for 9216 x 4096 at 95%
  sparsity on 2 threads into a new mapping, against 94.5 ms for nn.Linear's whole step in
  ``make bench``: the price of keeping ``weight`` dense-shaped).

Where-semantics: a pruned entry contributes nothing whatever it holds (NaN included): it is
never read.

Dtypes: fp32 and fp64 run as they are; fp16/bf16 are upcast to fp32 for the products (fp32
accumulation) and the results cast back. Backends (``_kernels.backend``): the C++ extension for
CPU fp32 (AVX-512, OpenMP), torch.sparse CSR elsewhere (fp64, CUDA, no compiler). Under
``torch.autocast`` the inputs are cast as ``F.linear`` would. Double backward
(``create_graph=True``) runs the backward as a graph of the plain twin
(``sparsekern.ops._launch.twin_vjp``: a dense recompute, only when asked for).

The reference twin, :func:`sparse_linear_reference`, is ``F.linear(x, weight * mask, bias)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsekern.ops._launch import autocast_to, check_linear_inputs, twin_vjp
from sparsekern.ops.sparse_train import _kernels
from sparsekern.ops.sparse_train.index import MaskIndex, mask_index

__all__ = [
    "gather_values",
    "sparse_linear",
    "sparse_linear_reference",
    "sparse_linear_values",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _transposed(t2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t2 [M, C] -> [C, M]`` contiguous in ``dtype`` (one pass: transpose and cast together)."""
    out = torch.empty(t2.shape[1], t2.shape[0], dtype=dtype, device=t2.device)
    out.copy_(t2.t())
    return out


def _untransposed(tt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(tt.shape[1], tt.shape[0], dtype=dtype, device=tt.device)
    out.copy_(tt.t())
    return out


def _twin_values(x, values, bias, index: MaskIndex):
    """The plain-torch twin in terms of the kept values (differentiable in all three)."""
    n, k = index.shape
    w = values.new_zeros(n * k).index_put((index.flat_idx,), values).view(n, k)
    return F.linear(x, w, bias)


class _SparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, index: MaskIndex):
        n, k = index.shape
        cd = _compute_dtype(x.dtype)
        x2 = x.reshape(-1, k)
        xt = _transposed(x2, cd)  # [K, M]: the batch contiguous, as the kernels read it
        v = values.to(cd)
        yt = _kernels.spmm(index.row_ptr, index.col_idx, v, xt)  # [N, M]
        y = _untransposed(yt, x.dtype)
        if bias is not None:
            y += bias
        ctx.index = index
        ctx.save_for_backward(x, values, bias, xt, v)
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, gy):
        x, values, bias, xt, v = ctx.saved_tensors
        index: MaskIndex = ctx.index
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            gx, gv, gb = twin_vjp(
                lambda a, b, c: _twin_values(a, b, c, index), (x, values, bias), needs[:3], gy
            )
            return gx, gv, gb, None
        n, k = index.shape
        gy2 = gy.reshape(-1, n)
        gyt = _transposed(gy2, xt.dtype)  # [N, M]
        gx = gv = gb = None
        if needs[0]:
            vt = _kernels.gather_dense(index.t_perm, v)  # W^T's values in its CSR order
            gxt = _kernels.spmm(index.t_row_ptr, index.t_col_idx, vt, gyt)  # [K, M]
            gx = _untransposed(gxt, x.dtype).view(x.shape)
        if needs[1]:
            gv = _kernels.sddmm(index.row_ptr, index.col_idx, gyt, xt).to(values.dtype)
        if needs[2] and bias is not None:
            gb = gy2.sum(0)
        return gx, gv, gb, None


class _GatherFn(torch.autograd.Function):
    """``weight [N, K...] -> values [nnz]`` at the kept entries; backward scatters the values'
    gradient into a dense weight-shaped tensor, exactly zero at pruned entries."""

    @staticmethod
    def forward(ctx, weight, index: MaskIndex):
        ctx.index = index
        return _kernels.gather_dense(index.flat_idx, weight)

    @staticmethod
    def backward(ctx, gv):
        index: MaskIndex = ctx.index
        if torch.is_grad_enabled():  # create_graph=True: differentiable scatter
            n = index.shape[0] * index.shape[1]
            g = gv.new_zeros(n).index_put((index.flat_idx,), gv)
        else:
            g = _kernels.scatter_dense(index.flat_idx, gv, index.shape[0] * index.shape[1])
        return g.view(index.weight_shape), None


def _check_index(who: str, index, shape, device) -> None:
    if not isinstance(index, MaskIndex):
        raise TypeError(f"{who}: expected index as a MaskIndex, got {type(index).__name__}")
    if index.weight_shape != tuple(shape):
        raise ValueError(
            f"{who}: expected an index of the weight's shape {list(shape)}, got "
            f"{list(index.weight_shape)}"
        )
    if index.device != device:
        raise ValueError(f"{who}: expected the index on {device}, got {index.device}")


def gather_values(weight: torch.Tensor, index: MaskIndex) -> torch.Tensor:
    """``weight``'s kept values ``[nnz]`` (CSR order), autograd-aware: their gradient reaches
    ``weight`` as a dense tensor, exactly zero at pruned entries."""
    _check_index("gather_values", index, weight.shape, weight.device)
    return _GatherFn.apply(weight, index)


def sparse_linear_values(
    x: torch.Tensor,
    values: torch.Tensor,
    index: MaskIndex,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` for the CSR matrix ``(index, values [nnz])`` of shape
    ``index.shape = (N, K)``, plus ``bias [N]``. Gradients reach ``x``, ``values`` (``[nnz]``)
    and ``bias``."""
    who = "sparse_linear_values"
    n, k = index.shape if isinstance(index, MaskIndex) else (None, None)
    if not isinstance(index, MaskIndex):
        _check_index(who, index, (), None)
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (index.nnz,):
        got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(
            f"{who}: expected values of shape [{index.nnz}] (the index's nnz), got {got}"
        )
    x, values, bias = autocast_to(x, values, bias)
    check_linear_inputs(who, x, n, k, values, bias)
    _check_index(who, index, index.weight_shape, values.device)
    return _SparseLinearFn.apply(x, values, bias, index)


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    index: MaskIndex | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` reading the kept weights only (see the module doc).

    Args:
        x: ``[..., K]``, floating point, the weight's dtype and device.
        weight: ``[N, K]``; entries where ``mask`` is False are never read.
        mask: bool ``[N, K]``; its CSR index is cached on it (``mask_index``).
        bias: optional ``[N]``.
        index: the mask's index if the caller has it (must match ``mask``'s shape).
    Returns:
        ``[..., N]``. ``weight.grad`` is dense ``[N, K]`` and exactly 0 where ``mask`` is False.
    """
    who = "sparse_linear"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{who}: expected a 2-D weight [N, K], got {got}")
    if not isinstance(mask, torch.Tensor) or mask.shape != weight.shape:
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"{who}: expected a mask of the weight's shape {list(weight.shape)}, got {got}"
        )
    n, k = weight.shape
    x, weight, bias = autocast_to(x, weight, bias)
    check_linear_inputs(who, x, n, k, weight, bias)
    if index is None:
        index = mask_index(mask)
    _check_index(who, index, weight.shape, weight.device)
    return _SparseLinearFn.apply(x, _GatherFn.apply(weight, index), bias, index)


def sparse_linear_reference(x, weight, mask, bias=None) -> torch.Tensor:
    """The plain-PyTorch twin: ``F.linear(x, where(mask, weight, 0), bias)`` (where-semantics:
    a pruned entry contributes nothing, NaN included)."""
    return F.linear(x, torch.where(mask, weight, torch.zeros((), dtype=weight.dtype)), bias)
