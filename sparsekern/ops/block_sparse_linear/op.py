"""The public block-sparse linear ops: ``block_sparse_linear`` (compact ``BlockSparseMatrix``)
and ``block_masked_linear`` (dense weight, block-structured mask). Each checks its inputs, picks
the path (Triton kernels, CPU BSR, or the reference / dense GEMM) and enters the autograd
function of ``custom_ops``."""

from __future__ import annotations

import torch

from sparsekern.formats.block_sparse import BlockSparseMatrix, block_grid, block_size_pair
from sparsekern.ops._launch import as_rows, autocast_to, check_linear_inputs
from sparsekern.ops._mask_cache import masked_copy
from sparsekern.ops._mask_pass import zero_pruned
from sparsekern.ops._triton import require_triton
from sparsekern.ops.block_sparse_linear.cpu import (
    CPU_BSR_MAX_DENSITY,
    CPU_BSR_MAX_DENSITY_TRAIN,
    CPU_DTYPES,
)
from sparsekern.ops.block_sparse_linear.custom_ops import _BlockSparseFunction
from sparsekern.ops.block_sparse_linear.kernels import _on_kernels
from sparsekern.ops.block_sparse_linear.layout import layout_of_mask
from sparsekern.ops.block_sparse_linear.reference import block_sparse_linear_reference
from sparsekern.ops.masked_linear import masked_linear
from sparsekern.ops.masked_weight import check_mask

__all__ = ["block_masked_linear", "block_sparse_linear"]


def _path(x: torch.Tensor) -> str:
    """``"kernels"`` (Triton: CUDA, or the CPU under the interpreter), ``"cpu"`` (torch.sparse
    BSR) or ``"reference"``."""
    if _on_kernels(x):
        return "kernels"
    return "cpu" if x.device.type == "cpu" and x.dtype in CPU_DTYPES else "reference"


def block_sparse_linear(
    x: torch.Tensor, weight: BlockSparseMatrix, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x @ weight.to_dense().T + bias``, touching only the stored blocks.

    Args:
        x: ``[..., in_features]``, any strides: float16/bfloat16/float32 on the Triton kernels,
            float32/float64 on the CPU (torch.sparse BSR); other cases run the reference.
        weight: ``BlockSparseMatrix`` of shape ``(out_features, in_features)``, x's dtype.
        bias: ``[out_features]`` or None (any strides).
    Returns:
        ``[..., out_features]``. Gradients go to ``x``, ``weight.values`` (``[nnz, bm, bk]``:
        stored blocks only, the padding of edge blocks gets 0) and ``bias``.
    """
    if not isinstance(weight, BlockSparseMatrix):
        raise TypeError(
            f"block_sparse_linear: expected weight as a BlockSparseMatrix, got "
            f"{type(weight).__name__}"
        )
    values = weight.values
    x, values, bias = autocast_to(x, values, bias)
    if values is not weight.values:
        weight = BlockSparseMatrix(
            values, weight.row_ptr, weight.col_idx, weight.shape, weight.block_size,
            validate=False,
        )  # fmt: skip
    check_linear_inputs("block_sparse_linear", x, weight.shape[0], weight.shape[1], values, bias)
    path = _path(x)
    if path == "reference":
        return block_sparse_linear_reference(x, weight, bias)
    if path == "kernels":
        require_triton("block_sparse_linear on this device")
    values = values if values.is_contiguous() else values.contiguous()
    bias = None if bias is None else bias.contiguous()
    meta = (weight.row_ptr, weight.col_idx, weight.block_row, weight.col_ptr, weight.t_row,
            weight.t_perm)  # fmt: skip
    # rows made here, not inside the Function: what it saves is then its own input, whose
    # autograd history a second derivative (twin_vjp) needs
    y = _BlockSparseFunction.apply(as_rows(x), values, bias, "compact", tuple(weight.shape), *meta)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def block_masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size=(32, 32),
    *,
    assume_pruned_zero: bool = False,
) -> torch.Tensor:
    """``y = x @ (weight * mask).T + bias`` on a dense weight, skipping the ``block_size`` blocks
    of ``mask`` that are all False in the forward, dX and dW (``SparseLinear``'s block mode).

    Same semantics and gradients as :func:`sparsekern.ops.masked_linear` (``dweight`` exactly 0
    where ``mask`` is False, nothing written at pruned blocks; pruned entries ignored, NaN
    included); time falls with the fraction of blocks kept. Any strides.

    Where it runs: the Triton kernels on CUDA (and the CPU under ``TRITON_INTERPRET=1``); on the
    CPU, torch.sparse BSR products over the stored blocks while at most
    :data:`CPU_BSR_MAX_DENSITY` of the blocks are kept (:data:`CPU_BSR_MAX_DENSITY_TRAIN` when
    the weight's gradient is computed), else the dense GEMM (``masked_linear``, which is faster
    there). ``assume_pruned_zero``: as in ``masked_linear`` (the weight is zero
    where the mask is False, so no masked copy is made).
    """
    bm, bk = block_size_pair(block_size)
    path = _path(x) if isinstance(x, torch.Tensor) else "reference"
    if path != "reference":
        x, weight, bias = autocast_to(x, weight, bias)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"block_masked_linear: expected weight 2-D [out, in], got {got}")
        check_mask(mask, weight, "block_masked_linear")
        check_linear_inputs(
            "block_masked_linear", x, weight.shape[0], weight.shape[1], weight, bias
        )
        training = torch.is_grad_enabled() and weight.requires_grad
        bound = CPU_BSR_MAX_DENSITY_TRAIN if training else CPU_BSR_MAX_DENSITY
        too_dense = layout_of_mask(mask, (bm, bk)).nnz > bound * _blocks(mask, (bm, bk))
        if path == "cpu" and too_dense:
            path = "reference"
    if path == "reference":
        return masked_linear(x, weight, mask, bias, assume_pruned_zero=assume_pruned_zero)
    if path == "kernels":
        require_triton("block_masked_linear on this device")
    # Block addresses assume row-major [out, in] storage: a strided weight runs on a contiguous
    # copy (its gradient flows back through the copy); the layout is cached on a contiguous mask.
    mask = mask if mask.is_contiguous() else mask.contiguous()
    if not assume_pruned_zero and layout_of_mask(mask, (bm, bk)).keep is not None:
        # Holes inside kept blocks: the kernels read blocks as they are, so run them on the
        # masked weight (its gradient is masked by autograd's where)
        weight = _masked_weight_value(weight, mask)
    weight = weight if weight.is_contiguous() else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = _BlockSparseFunction.apply(as_rows(x), weight, bias, "masked", (bm, bk), mask)
    # rows made outside: see block_sparse_linear
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _blocks(mask: torch.Tensor, block) -> int:
    R, C = block_grid(tuple(mask.shape), block)
    return R * C


def _masked_weight_value(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``where(mask, weight, 0)``: differentiable (dW flows through the where, exactly zero at
    pruned entries) when the weight needs a gradient, else the cached masked copy."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return zero_pruned(weight, mask)
    return masked_copy(weight, mask)
