"""What the sparse-training Triton kernels (``triton_spmm``, ``triton_sddmm``) share: the input
checks of a CSR matrix and its dense operands, the benchmark shape of the static contract, and
the panel-size statistics their launchers read from ``row_ptr``.

Layout (why the dense operands are "feature-major", ``[features, batch]`` with the batch
contiguous): a stored entry ``(n, k)`` of ``W [N, K]`` multiplies a whole row ``k`` of the dense
operand, for every batch column ``m``. With ``x [K, M]`` and ``M`` contiguous that row is one
contiguous run of ``M`` elements, so a program's gather of ``BLOCK_M`` columns is one 16-byte
vector per 8 elements (``LDG.E.128``, or ``cp.async`` into shared memory); with the usual
``x [M, K]`` (K contiguous) the same gather would touch ``BLOCK_M`` different 32-byte sectors for
2 useful bytes each (16x the traffic). So:

* SpMM ``out [N, M] = W @ x`` takes ``x [K, M]``: forward ``y^T = W x^T``, and dX ``dx^T = W^T
  dy^T`` with the CSR of ``W^T``;
* SDDMM ``out[j] = a[n_j, :] . b[k_j, :]`` takes ``a [N, M]``, ``b [K, M]``: dW at the mask is
  ``sddmm(W's CSR, dy^T, x^T)``.

One transpose of the activations per layer (``x.t().contiguous()``, 2 passes over x) buys this;
a caller that keeps activations feature-major pays none. Every kernel takes both strides of
every dense operand, so other layouts run too (correct, uncoalesced).
"""

from __future__ import annotations

import torch

from sparsekern.ops._launch import KERNEL_DTYPES

__all__ = [
    "BENCH_SHAPE",
    "batch_offsets_fit",
    "bench_csr",
    "check_csr",
    "check_dense",
    "max_panel_nnz",
]

# The benchmark shape of the static contract and of benchmarks/bench_sparse_train_gpu.py:
# W [4096, 4096] at 5% kept, a batch of 4096 columns, bf16 (issue 24's GPU target).
BENCH_SHAPE = {"N": 4096, "K": 4096, "M": 4096, "density": 0.05}


def check_csr(who: str, row_ptr, col_idx, values, n_rows: int) -> None:
    """Raise (naming expected vs got) unless ``row_ptr`` is int32 ``[n_rows + 1]``, ``col_idx``
    int32 ``[nnz]`` and ``values`` ``[nnz]`` (when given) in a kernel dtype, all contiguous on
    one device. O(1): the entries themselves are the index builder's to validate."""
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx), ("values", values)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: expected {name} as a Tensor, got {type(t).__name__}")
    if row_ptr.dtype != torch.int32 or tuple(row_ptr.shape) != (n_rows + 1,):
        raise ValueError(
            f"{who}: expected row_ptr int32 [{n_rows + 1}], got {row_ptr.dtype} "
            f"{list(row_ptr.shape)}"
        )
    if col_idx.dtype != torch.int32 or col_idx.dim() != 1:
        raise ValueError(
            f"{who}: expected col_idx int32 [nnz], got {col_idx.dtype} {list(col_idx.shape)}"
        )
    if values is not None:
        if values.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"{who}: values: expected float16, bfloat16 or float32, got {values.dtype}"
            )
        if tuple(values.shape) != tuple(col_idx.shape):
            raise ValueError(
                f"{who}: expected values of col_idx's shape {list(col_idx.shape)}, got "
                f"{list(values.shape)}"
            )
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx), ("values", values)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{who}: expected {name} contiguous, got a strided view")


def check_dense(who: str, tensors: dict, dtype, device) -> None:
    """Raise unless every tensor of ``tensors`` is 2-D, of ``dtype``, on ``device``."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: expected {name} as a Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{who}: expected {name} 2-D, got shape {list(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{who}: expected {name} as {dtype}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{who}: expected {name} on {device}, got {t.device}")


def batch_offsets_fit(t: torch.Tensor) -> bool:
    """True when every batch offset ``m * t.stride(1)`` of a 2-D operand fits int32. The kernels
    keep batch offsets in int32 (row and column offsets, ``index * stride(0)``, are int64): a
    batch-contiguous operand always fits; the launchers copy one that does not."""
    return (t.shape[1] - 1) * abs(t.stride(1)) < 2**31


def max_panel_nnz(row_ptr: torch.Tensor, panel: int) -> int:
    """The most entries any panel of ``panel`` consecutive rows holds (one device sync: the
    launchers size their grids with it)."""
    n = row_ptr.numel() - 1
    if n <= 0:
        return 0
    ends = torch.arange(panel, n + panel, panel, device=row_ptr.device).clamp_(max=n)
    starts = torch.arange(0, n, panel, device=row_ptr.device)
    return int((row_ptr[ends].long() - row_ptr[starts].long()).max())


def bench_csr(density: float, n: int, k: int, device, dtype, seed: int = 0):
    """A random CSR ``(row_ptr, col_idx, values)`` of ``W [n, k]`` at ``density`` (each entry kept
    with that probability; columns ascending within a row), for tests and benchmarks."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(n, k, generator=g) < density
    flat = keep.reshape(-1).nonzero().squeeze(1)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(keep.sum(1), 0, out=row_ptr[1:])
    col = (flat % k).to(torch.int32)
    values = torch.randn(flat.numel(), generator=g).to(dtype)
    return row_ptr.to(torch.int32).to(device), col.to(device), values.to(device)
