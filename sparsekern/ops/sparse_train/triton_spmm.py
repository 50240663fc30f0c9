"""Triton SpMM for unstructured sparse training: ``out [N, M] = W @ x`` with ``W [N, K]`` in
standard CSR and ``x [K, M]`` dense, batch contiguous (``triton_common``'s module doc says why
this layout). Forward: ``y^T = spmm(W's CSR, x^T)``; dX: ``dx^T = spmm(W^T's CSR, dy^T)``, the
CSR of ``W^T`` being ``(t_row_ptr, t_col_idx, values[t_perm])``.

Two kernels, both fp32 accumulation, fp16 / bf16 / fp32 inputs, masked ragged edges, int64
offsets for every product that can pass 2^31 (``col * stride``, ``row * stride``):

* ``_spmm_rows_kernel`` (Sputnik's row split, CUDA cores): one program per (row ``n``, tile of
  ``BLOCK_M`` batch columns). It streams row ``n``'s values and column indices ``BLOCK_J`` at a
  time, gathers rows ``x[col, tile]`` (contiguous: 16-byte vector loads) and accumulates
  ``[BLOCK_J, BLOCK_M]`` products in registers, reduced once at the end. Programs of consecutive
  ids share the batch tile, so the ``[K, BLOCK_M]`` slice of x they gather from (1 MiB at the
  benchmark shape) stays in L2. Load balance: ``row_order`` (Sputnik's row swizzle) launches
  rows longest first; :func:`row_swizzle` returns it only where row lengths vary enough to pay.
* ``_spmm_dot_kernel`` (Flash-LLM's "load sparse, compute dense", tensor cores): one program per
  (panel of ``BLOCK_N = 16`` rows, batch tile). The panel's entries are contiguous in CSR; per
  step it loads ``BLOCK_J`` of them sparse (column indices), gathers ``g = x[col, tile]``
  ``[BLOCK_J, BLOCK_M]`` and reads the dense selection tile ``s [BLOCK_J, BLOCK_N]`` (``s[j, r] =
  value_j`` where entry ``j`` lies in the panel's row ``r``), then ``acc [BLOCK_M, BLOCK_N] +=
  g^T @ s`` on the tensor cores. ``s`` comes from ``sel [nnz, BLOCK_N]``, which the launcher
  expands from ``values`` each call (:func:`panel_select`: one scatter, 32 bytes per entry in
  bf16): built in registers instead, it would be stored to shared memory every step as the
  wgmma's B operand, and each store must wait for the previous wgmma (compiled: pendings 0, no
  overlap). Dense compute costs ``BLOCK_N`` MACs per useful one (16 x the kernel's useful FLOPs,
  ``0.8 x`` a dense GEMM's at 5% kept): it can beat ``rows`` where ``rows`` is bound by issuing
  CUDA-core FMAs (gathers served from L1), never by FLOPs; at the benchmark shape both are bound
  by the L2 traffic of the gathers. ``BLOCK_N`` is 16: ``tl.dot`` takes no dimension under 16.

Neither is the CUDA default of any layer: no GPU benchmark has measured them against cuBLAS
(``benchmarks/bench_sparse_train_gpu.py``, ``benchmarks/NOTES.md``). Reference twin:
:func:`spmm_reference`.
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
)

__all__ = [
    "PANEL_ROWS",
    "compile_specs",
    "panel_select",
    "row_swizzle",
    "spmm",
    "spmm_reference",
    "spmm_variant",
]

# Rows per panel of the tensor-core kernel: tl.dot's smallest dimension.
PANEL_ROWS = 16
# CUDA's limit on a grid's second axis (the batch tiles).
_MAX_GRID_Y = 65535
# Row swizzle pays where the longest row is this many times the mean (Sputnik sorts always; a
# binomial row length at 5% of 4096 has max/mean ~1.3, where sorting moves nothing).
SWIZZLE_MIN_SKEW = 1.5

# ---------------------------------------------------------------------------------------------
# Autotune configs (data). rows: (BLOCK_J, BLOCK_M, warps): a [BLOCK_J, BLOCK_M] fp32 product
# tile of 16-32 registers a thread and 8 batch columns (16 bytes) a thread per gathered row.
# dot: (BLOCK_J, BLOCK_M, warps, stages): BLOCK_M = 64 x warps / 4 rows of wgmma (one warpgroup
# per 64 rows), BLOCK_J the K step of the MMA.
# ---------------------------------------------------------------------------------------------
_ROWS_CONFIGS = [(16, 128, 4), (32, 64, 4), (8, 256, 4)]
_DOT_CONFIGS = [(64, 128, 8, 3), (64, 64, 4, 4), (32, 128, 8, 4)]
_ROWS_INTERPRETER = (8, 16, 1)
_DOT_INTERPRETER = (16, 16, 1, 1)


def _rows_configs() -> list:
    rows = [_ROWS_INTERPRETER] if interpreter_enabled() else _ROWS_CONFIGS
    return [
        triton.Config({"BLOCK_J": j, "BLOCK_M": m}, num_warps=w, num_stages=1) for j, m, w in rows
    ]


def _dot_configs() -> list:
    rows = [_DOT_INTERPRETER] if interpreter_enabled() else _DOT_CONFIGS
    return [
        triton.Config({"BLOCK_J": j, "BLOCK_M": m}, num_warps=w, num_stages=s)
        for j, m, w, s in rows
    ]


@triton.autotune(configs=_rows_configs(), key=["N", "M", "ROW_NNZ"])
@triton.jit
def _spmm_rows_kernel(
    row_ptr_ptr, col_ptr, val_ptr, x_ptr, order_ptr, out_ptr,
    N, M, ROW_NNZ,
    stride_xk, stride_xm, stride_on, stride_om,
    HAS_ORDER: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``out[n, m] = sum_j values[j] * x[col[j], m]`` over row n's entries; ROW_NNZ (the bucketed
    mean row length) only keys the autotuner."""
    pid = tl.program_id(0)
    n = tl.load(order_ptr + pid) if HAS_ORDER else pid
    start = tl.load(row_ptr_ptr + n)
    end = tl.load(row_ptr_ptr + n + 1)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_j = tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_J, BLOCK_M), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_J):
        j = j0 + offs_j
        ok = j < end
        v = tl.load(val_ptr + j, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(col_ptr + j, mask=ok, other=0).to(tl.int64)  # c * stride can pass 2^31
        g = tl.load(
            x_ptr + c[:, None] * stride_xk + offs_m[None, :] * stride_xm,
            mask=ok[:, None] & m_ok[None, :], other=0.0,
        )  # fmt: skip
        acc += g.to(tl.float32) * v[:, None]
    out = tl.sum(acc, axis=0)
    o_ptrs = out_ptr + n.to(tl.int64) * stride_on + offs_m * stride_om
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok)


@triton.autotune(configs=_dot_configs(), key=["N", "M", "ROW_NNZ"])
@triton.jit
def _spmm_dot_kernel(
    row_ptr_ptr, col_ptr, sel_ptr, x_ptr, out_ptr,
    N, M, ROW_NNZ,
    stride_xk, stride_xm, stride_on, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``out[n0:n0+BLOCK_N, tile] = W[panel] @ x[:, tile]`` as the sum over steps of ``g^T @ s``:
    ``g`` the gathered rows of x, ``s`` the step's rows of ``sel [nnz, BLOCK_N]`` (entry j's value
    in the column of its row within the panel, zeros elsewhere)."""
    n0 = tl.program_id(0) * BLOCK_N
    offs_r = n0 + tl.arange(0, BLOCK_N)
    lo = tl.load(row_ptr_ptr + n0)
    hi = tl.load(row_ptr_ptr + tl.minimum(n0 + BLOCK_N, N))
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_j = tl.arange(0, BLOCK_J)
    offs_s = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_J):
        j = j0 + offs_j
        ok = j < hi
        c = tl.load(col_ptr + j, mask=ok, other=0).to(tl.int64)  # c * stride can pass 2^31
        g = tl.load(
            x_ptr + c[:, None] * stride_xk + offs_m[None, :] * stride_xm,
            mask=ok[:, None] & m_ok[None, :], other=0.0,
        )  # fmt: skip
        # loaded, not built in registers: a register-built wgmma B operand is stored to shared
        # memory every step, and the next store must wait for the last wgmma (pendings 0)
        s = tl.load(
            sel_ptr + j[:, None].to(tl.int64) * BLOCK_N + offs_s[None, :],
            mask=ok[:, None], other=0.0,
        )  # fmt: skip
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong; fp32 is exact for bf16 inputs
            acc = tl.dot(tl.trans(g.to(tl.float32)), s.to(tl.float32), acc)
        else:
            acc = tl.dot(tl.trans(g), s, acc, input_precision=PRECISION)
    o_ptrs = out_ptr + offs_r[None, :].to(tl.int64) * stride_on + offs_m[:, None] * stride_om
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_r < N)[None, :] & m_ok[:, None])


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def row_swizzle(row_ptr: torch.Tensor) -> torch.Tensor | None:
    """Sputnik's row swizzle: the rows longest first (int32 ``[N]``), or None where the longest
    row is under :data:`SWIZZLE_MIN_SKEW` x the mean (the launch order then changes nothing that
    pays). One device sync; cache it with the index (it depends on ``row_ptr`` only)."""
    lengths = torch.diff(row_ptr.long())
    if lengths.numel() == 0 or int(lengths.sum()) == 0:
        return None
    if float(lengths.max()) < SWIZZLE_MIN_SKEW * float(lengths.float().mean()):
        return None
    return torch.argsort(lengths, descending=True, stable=True).to(torch.int32)


def spmm_variant(dtype: torch.dtype, m: int) -> str:
    """The static rule of ``variant="auto"`` (unmeasured on a GPU: benchmarks/NOTES.md):
    tensor cores ("dot") for 16-bit inputs and at least 64 batch columns (one wgmma row block);
    else the CUDA-core row split ("rows"). fp32 takes "rows": its tl.dot would be ieee fp32 (no
    tensor cores) at 16 x the FLOPs."""
    return "dot" if dtype in (torch.float16, torch.bfloat16) and m >= 64 else "rows"


def spmm(
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    x: torch.Tensor,
    n_rows: int,
    *,
    variant: str = "auto",
    row_order: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out [n_rows, M] = W @ x`` with ``W [n_rows, K]`` the CSR ``(row_ptr int32 [n_rows+1],
    col_idx int32 [nnz], values [nnz])`` and ``x [K, M]`` (any strides; batch-contiguous is the
    fast layout). No autograd.

    Args:
        variant: "rows" (CUDA cores), "dot" (tensor cores) or "auto" (:func:`spmm_variant`).
            Non-finite values in x run "rows" (one ``isfinite`` pass over x and a sync decide):
            an output row sums its own stored entries only, so an inf in ``x[k]`` reaches the
            rows that store column ``k`` and no other.
        row_order: int32 ``[n_rows]``, a permutation of the rows to launch in (``"rows"`` only;
            :func:`row_swizzle`).
        out: ``[n_rows, M]`` of x's dtype to write into (any strides).
    Returns:
        ``out``, x's dtype, fp32 accumulation. Runs on CUDA, or on the CPU under
        ``TRITON_INTERPRET=1``.
    """
    require_triton("sparse_train spmm")
    check_csr("spmm", row_ptr, col_idx, values, n_rows)
    check_dense("spmm", {"x": x}, values.dtype, values.device)
    if row_ptr.device != x.device or col_idx.device != x.device:
        raise ValueError(
            f"spmm: expected row_ptr, col_idx on x's device {x.device}, got {row_ptr.device}, "
            f"{col_idx.device}"
        )
    if variant not in ("auto", "rows", "dot"):
        raise ValueError(f"spmm: expected variant 'auto', 'rows' or 'dot', got {variant!r}")
    if variant == "dot" and row_order is not None:
        raise ValueError("spmm: row_order serves variant 'rows' only, got it with 'dot'")
    if row_order is not None and (
        row_order.dtype != torch.int32
        or tuple(row_order.shape) != (n_rows,)
        or row_order.device != x.device
    ):
        raise ValueError(
            f"spmm: expected row_order int32 [{n_rows}] on {x.device}, got {row_order.dtype} "
            f"{list(row_order.shape)} on {row_order.device}"
        )
    K, M = x.shape
    if triton.cdiv(M, 64) > _MAX_GRID_Y:
        raise ValueError(
            f"spmm: expected at most {64 * _MAX_GRID_Y} batch columns (the grid's second axis "
            f"holds one program per 64-256 of them), got x [{K}, {M}]; split the batch"
        )
    y = out_tensor(out, (n_rows, M), x, x.dtype)
    if n_rows == 0 or M == 0:
        return y
    nnz = values.numel()
    if nnz == 0:  # nothing stored (K may be 0: the kernels' gathers need a row of x)
        return y.zero_()
    if not batch_offsets_fit(x):
        x = x.contiguous()
    if not batch_offsets_fit(y):  # write a batch-contiguous result, then copy it over
        y.copy_(spmm(row_ptr, col_idx, values, x, n_rows, variant=variant, row_order=row_order))
        return y
    if variant == "auto":
        variant = "rows" if row_order is not None else spmm_variant(x.dtype, M)
    if variant == "dot" and not bool(torch.isfinite(x).all()):
        # where-semantics (an output row sums its stored entries only): "dot" multiplies every
        # gathered row by the other 15 rows' zeros too, and 0 * inf = NaN would reach them
        variant = "rows"
    row_nnz = _next_pow2(max(1, nnz // n_rows))
    common = (
        n_rows, M, row_nnz, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
    )  # fmt: skip
    if variant == "rows":

        def grid(meta):
            return (n_rows, triton.cdiv(M, meta["BLOCK_M"]))

        order = row_order if row_order is not None else row_ptr
        _spmm_rows_kernel[grid](
            row_ptr, col_idx, values, x, order, y, *common, HAS_ORDER=row_order is not None
        )
        return y
    sel = panel_select(row_ptr, values)

    def grid(meta):
        return (triton.cdiv(n_rows, PANEL_ROWS), triton.cdiv(M, meta["BLOCK_M"]))

    _spmm_dot_kernel[grid](
        row_ptr, col_idx, sel, x, y, *common,
        BLOCK_N=PANEL_ROWS, UPCAST=interpreter_upcast(x.dtype),
        PRECISION=dot_precision(x.dtype),
    )  # fmt: skip
    return y


def panel_select(row_ptr: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sel [nnz, PANEL_ROWS]``: row ``j`` holds ``values[j]`` in column ``n_j % PANEL_ROWS``
    (its row's place in its panel), zeros elsewhere; the "dot" kernel's B operand. One
    ``repeat_interleave`` and one scatter (``nnz x 32`` bytes in bf16)."""
    nnz = values.numel()
    rows = torch.repeat_interleave(
        torch.arange(row_ptr.numel() - 1, device=values.device), torch.diff(row_ptr.long()),
        output_size=nnz,
    )  # fmt: skip
    sel = values.new_zeros((nnz, PANEL_ROWS))
    sel.scatter_(1, (rows % PANEL_ROWS)[:, None], values[:, None])
    return sel


def spmm_reference(row_ptr, col_idx, values, x, n_rows: int) -> torch.Tensor:
    """Plain PyTorch twin of :func:`spmm`: ``out [n_rows, M] = W @ x`` by ``index_add_`` of
    ``values[:, None] * x[col]`` over the rows, in fp32 (float64 for float64 inputs), returned
    in x's dtype. Memory ``nnz x M``: a test-sized reference."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = torch.repeat_interleave(
        torch.arange(n_rows, device=x.device), torch.diff(row_ptr.long())
    )
    out = torch.zeros((n_rows, x.shape[1]), dtype=acc, device=x.device)
    out.index_add_(0, rows, values.to(acc)[:, None] * x.to(acc)[col_idx.long()])
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Static performance contract (``python -m sparsekern.ops._compile_check``)
# ---------------------------------------------------------------------------------------------
def compile_specs():
    """Both kernels at :data:`BENCH_SHAPE` (W 4096 x 4096 at 5% kept, x [4096, 4096]
    batch-contiguous: ``stride_xm = stride_om = 1`` become constexprs as the JIT makes them;
    ``ROW_NNZ`` = 256, the bucket of 205 entries a row), every config, bf16 / fp16 / fp32.
    ``hot``: bf16. "rows" is held to the "memory" contract (no matrix product: CUDA-core FMAs on
    gathered rows, bound by the gather traffic; no spills, 16-byte vector loads); "dot" to the
    "gemm" contract (wgmma overlapped, cp.async)."""
    n, k, m = BENCH_SHAPE["N"], BENCH_SHAPE["K"], BENCH_SHAPE["M"]
    row_nnz = _next_pow2(int(k * BENCH_SHAPE["density"]))
    values = {
        "N": n, "M": m, "ROW_NNZ": row_nnz,
        "stride_xk": m, "stride_xm": 1, "stride_on": m, "stride_om": 1,
    }  # fmt: skip
    for dt in ("bf16", "fp16", "fp32"):
        ptrs = {"row_ptr_ptr": "*i32", "col_ptr": "*i32", "x_ptr": f"*{dt}", "out_ptr": f"*{dt}"}
        ints = {name: "i32" for name in values}
        for j, bm, w in _ROWS_CONFIGS:
            yield {
                "name": f"sparse_spmm.rows[{dt},j{j},m{bm},w{w}]",
                "fn": _spmm_rows_kernel.fn,
                "signature": ptrs | {"val_ptr": f"*{dt}", "order_ptr": "*i32"} | ints,
                "constexprs": {"HAS_ORDER": False, "BLOCK_J": j, "BLOCK_M": bm},
                "values": values,
                "num_warps": w,
                "num_stages": 1,
                "hot": dt == "bf16",
                "contract": "memory",
            }
        for j, bm, w, s in _DOT_CONFIGS:
            yield {
                "name": f"sparse_spmm.dot[{dt},j{j},m{bm},w{w},s{s}]",
                "fn": _spmm_dot_kernel.fn,
                "signature": ptrs | {"sel_ptr": f"*{dt}"} | ints,
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
