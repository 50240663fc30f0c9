"""Triton SDDMM for unstructured sparse training: ``out[j] = (a @ b^T)[n_j, k_j]`` at the stored
entries ``j`` of a CSR pattern of ``[N, K]``, with ``a [N, M]`` and ``b [K, M]`` dense, batch
contiguous (``triton_common``'s module doc says why). dW at the mask: ``dvalues = sddmm(W's CSR,
dy^T, x^T)`` (``dW = dy^T x``, never formed dense).

``_sddmm_dot_kernel`` (tensor cores, one program per (panel of ``BLOCK_N = 16`` rows, chunk of
``BLOCK_J`` of the panel's entries)): the panel's entries are contiguous in CSR, so a chunk's
columns are ``BLOCK_J`` consecutive int32s. Per step of ``BLOCK_M`` batch columns it gathers
``g = b[col, step]`` ``[BLOCK_J, BLOCK_M]`` (contiguous rows: vector / cp.async loads) and the
panel's rows of ``a`` ``[BLOCK_N, BLOCK_M]``, and accumulates ``p [BLOCK_J, BLOCK_N] += g @
a_panel^T`` on the tensor cores (the MMA's K is the batch). After the batch loop, entry ``j``
keeps ``p[j, r_j]``, its own row's column (the panel's row pointers select it). Dense compute
costs ``BLOCK_N`` = 16 MACs per useful one (tl.dot takes no dimension under 16); the useful
result is one fp32 per entry, so nothing is written but ``out``. fp32 accumulation, fp16 / bf16 /
fp32 inputs, masked edges, int64 offsets for ``col * stride`` and ``row * stride``.

Not the CUDA default of any layer: no GPU benchmark has measured it (``benchmarks/NOTES.md``).
Reference twin: :func:`sddmm_reference`.
"""

from __future__ import annotations

import torch

from sparsekern.ops._dispatch import interpreter_enabled
from sparsekern.ops._launch import dot_precision, interpreter_upcast, out_tensor
from sparsekern.ops._triton import require_triton, tl, triton
from sparsekern.ops.sparse_train.triton_common import (
    BENCH_SHAPE,
    batch_offsets_fit,
    check_csr,
    check_dense,
    max_panel_nnz,
)

__all__ = ["PANEL_ROWS", "compile_specs", "sddmm", "sddmm_reference"]

PANEL_ROWS = 16
# The fullest 16-row panel of the benchmark's W (bench_csr(0.05, 4096, 4096), seed 0; the mean
# panel holds 3279 entries): the value of MOST in the compile specs.
BENCH_MOST = 3424

# (BLOCK_J entries, BLOCK_M batch step, warps, stages): BLOCK_J is the wgmma's row block (64 a
# warpgroup), BLOCK_M its K step; the gathered [BLOCK_J, BLOCK_M] tile is 16 KiB in bf16 at
# 128 x 64, x stages in shared memory.
_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 4), (128, 32, 8, 4)]
_INTERPRETER = (16, 16, 1, 1)


def _configs() -> list:
    rows = [_INTERPRETER] if interpreter_enabled() else _CONFIGS
    return [
        triton.Config({"BLOCK_J": j, "BLOCK_M": m}, num_warps=w, num_stages=s)
        for j, m, w, s in rows
    ]


@triton.autotune(configs=_configs(), key=["N", "M", "PANEL_NNZ"])
@triton.jit
def _sddmm_dot_kernel(
    row_ptr_ptr, col_ptr, a_ptr, b_ptr, out_ptr,
    N, M, MOST, PANEL_NNZ,
    stride_an, stride_am, stride_bk, stride_bm,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``out[j] = sum_m a[row_j, m] * b[col_j, m]`` for one chunk of one panel's entries. The grid
    is flat (panels x chunks can pass 65535, the limit of a second grid axis): program ``pid``
    takes panel ``pid // chunks``, chunk ``pid % chunks``, ``chunks`` sized by ``MOST``, the
    fullest panel's entries. PANEL_NNZ (MOST bucketed) only keys the autotuner."""
    chunks = tl.cdiv(MOST, BLOCK_J)
    pid = tl.program_id(0)
    n0 = (pid // chunks) * BLOCK_N
    lo = tl.load(row_ptr_ptr + n0)
    hi = tl.load(row_ptr_ptr + tl.minimum(n0 + BLOCK_N, N))
    j0 = lo + (pid % chunks) * BLOCK_J
    if j0 >= hi:  # the grid covers the fullest panel; this one is done
        return
    j = j0 + tl.arange(0, BLOCK_J)
    ok = j < hi
    c = tl.load(col_ptr + j, mask=ok, other=0).to(tl.int64)  # c * stride can pass 2^31
    offs_r = n0 + tl.arange(0, BLOCK_N)
    r_ok = offs_r < N
    starts = tl.load(row_ptr_ptr + offs_r, mask=r_ok, other=0)
    ends = tl.load(row_ptr_ptr + offs_r + 1, mask=r_ok, other=0)  # rows past N: empty [0, 0)
    offs_m = tl.arange(0, BLOCK_M)
    g_ptrs = b_ptr + c[:, None] * stride_bk + offs_m[None, :] * stride_bm
    a_ptrs = a_ptr + offs_r[:, None].to(tl.int64) * stride_an + offs_m[None, :] * stride_am
    p = tl.zeros((BLOCK_J, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m_ok = (m0 + offs_m) < M
        g = tl.load(g_ptrs, mask=ok[:, None] & m_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong; fp32 is exact for bf16 inputs
            p = tl.dot(g.to(tl.float32), tl.trans(a.to(tl.float32)), p)
        else:
            p = tl.dot(g, tl.trans(a), p, input_precision=PRECISION)
        g_ptrs += BLOCK_M * stride_bm
        a_ptrs += BLOCK_M * stride_am
    inside = (j[:, None] >= starts[None, :]) & (j[:, None] < ends[None, :])
    out = tl.sum(tl.where(inside, p, 0.0), axis=1)
    tl.store(out_ptr + j, out.to(out_ptr.dtype.element_ty), mask=ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def sddmm(
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out [nnz]``: ``out[j] = sum_m a[n_j, m] * b[k_j, m]`` for the entries ``j`` of the CSR
    pattern ``(row_ptr int32 [N+1], col_idx int32 [nnz])`` of an ``[N, K]`` matrix; ``a [N, M]``,
    ``b [K, M]``, one dtype (float16, bfloat16, float32), any strides (batch-contiguous is the
    fast layout). No autograd.

    Returns ``out`` in a's dtype, fp32 accumulation; ``out=`` a contiguous ``[nnz]`` tensor to
    write into. One device sync (the fullest panel sizes the grid). Runs on CUDA, or on the CPU
    under ``TRITON_INTERPRET=1``.
    """
    require_triton("sparse_train sddmm")
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"sddmm: expected a as a Tensor, got {type(a).__name__}")
    n = row_ptr.numel() - 1 if isinstance(row_ptr, torch.Tensor) else -1
    check_csr("sddmm", row_ptr, col_idx, None, n)
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"sddmm: a: expected float16, bfloat16 or float32, got {a.dtype}")
    check_dense("sddmm", {"a": a, "b": b}, a.dtype, a.device)
    if row_ptr.device != a.device or col_idx.device != a.device:
        raise ValueError(
            f"sddmm: expected row_ptr, col_idx on a's device {a.device}, got {row_ptr.device}, "
            f"{col_idx.device}"
        )
    if a.shape[0] != n or b.shape[1] != a.shape[1]:
        raise ValueError(
            f"sddmm: expected a [{n}, M] (row_ptr's rows) and b [K, M] with a's M, got a "
            f"{list(a.shape)}, b {list(b.shape)}"
        )
    nnz = col_idx.numel()
    res = out_tensor(out, (nnz,), a, a.dtype)
    if out is not None and not out.is_contiguous():
        raise ValueError("sddmm: expected out contiguous, got a strided view")
    if nnz == 0:
        return res
    M = a.shape[1]
    if M == 0:
        return res.zero_()
    a = a if batch_offsets_fit(a) else a.contiguous()
    b = b if batch_offsets_fit(b) else b.contiguous()
    most = max_panel_nnz(row_ptr, PANEL_ROWS)

    def grid(meta):
        return (triton.cdiv(n, PANEL_ROWS) * triton.cdiv(most, meta["BLOCK_J"]),)

    _sddmm_dot_kernel[grid](
        row_ptr, col_idx, a, b, res,
        n, M, most, _next_pow2(most),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        BLOCK_N=PANEL_ROWS, UPCAST=interpreter_upcast(a.dtype), PRECISION=dot_precision(a.dtype),
    )  # fmt: skip
    return res


def sddmm_reference(row_ptr, col_idx, a, b) -> torch.Tensor:
    """Plain PyTorch twin of :func:`sddmm`: ``(a[rows] * b[cols]).sum(1)`` in fp32 (float64 for
    float64 inputs), returned in a's dtype. Memory ``nnz x M``: a test-sized reference."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    n = row_ptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n, device=a.device), torch.diff(row_ptr.long()))
    return (a.to(acc)[rows] * b.to(acc)[col_idx.long()]).sum(1).to(a.dtype)


# ---------------------------------------------------------------------------------------------
# Static performance contract (``python -m sparsekern.ops._compile_check``)
# ---------------------------------------------------------------------------------------------
def compile_specs():
    """The kernel at :data:`BENCH_SHAPE` (a = dy^T [4096, 4096], b = x^T [4096, 4096],
    batch-contiguous: ``stride_am = stride_bm = 1`` become constexprs; W's CSR at 5% kept:
    ``MOST`` = :data:`BENCH_MOST` entries in the fullest 16-row panel, ``PANEL_NNZ`` = 4096),
    every config, bf16 / fp16 / fp32. ``hot``: bf16, held to the "gemm" contract (wgmma
    overlapped, cp.async)."""
    n, m, most = BENCH_SHAPE["N"], BENCH_SHAPE["M"], BENCH_MOST
    values = {
        "N": n, "M": m, "MOST": most, "PANEL_NNZ": _next_pow2(most),
        "stride_an": m, "stride_am": 1, "stride_bk": m, "stride_bm": 1,
    }  # fmt: skip
    for dt in ("bf16", "fp16", "fp32"):
        sig = {
            "row_ptr_ptr": "*i32", "col_ptr": "*i32",
            "a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "out_ptr": f"*{dt}",
        } | {name: "i32" for name in values}  # fmt: skip
        for j, bm, w, s in _CONFIGS:
            yield {
                "name": f"sparse_sddmm.dot[{dt},j{j},m{bm},w{w},s{s}]",
                "fn": _sddmm_dot_kernel.fn,
                "signature": sig,
                "constexprs": {
                    "BLOCK_N": PANEL_ROWS,
                    "BLOCK_J": j,
                    "BLOCK_M": bm,
                    "UPCAST": False,
                    "PRECISION": "ieee" if dt == "fp32" else "tf32",
                },  # fmt: skip
                "values": values,
                "num_warps": w,
                "num_stages": s,
                "hot": dt == "bf16",
                "contract": "gemm",
            }
