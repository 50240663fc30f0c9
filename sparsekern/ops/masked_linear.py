"""masked_linear: ``y = x (W*M)^T + b`` whose weight gradient is exactly zero at pruned weights.

Where it runs (the rule: a sparse layer never costs more than its dense twin):

* forward ``y = x (W*M)^T + b`` and dX ``dx = dy (W*M)``: the vendor GEMM (cuBLAS on CUDA,
  MKL/oneDNN on the CPU) on ``W*M``. For the sparse modules ``W*M`` *is* ``W`` (pruned weights are
  exactly zero by the mask invariant, ``assume_pruned_zero=True``), so they run exactly what
  ``nn.Linear`` runs. For any other weight the GEMM runs on ``where(M, W, 0)`` (``masked_weight``:
  cached for inference, computed per call in training).
* dW ``(dy^T x) * M``: two backends, picked per call by :func:`dw_backend_for`:

  - ``"vendor"`` (the default): the vendor GEMM, then one pass zeroing the pruned entries
    (``_mask_pass``; 5 bytes per bf16 weight on a GPU, ~24 us for 4096 x 4096 at 3.35 TB/s
    against ~0.35 ms for the M=8192 GEMM; ~11 ms for a 4096 x 9216 fp32 gradient on 2 CPU cores);
  - ``"kernel"``: ``_mm_mask_c_kernel`` (Triton), the mask fused into the GEMM's epilogue and every
    output tile whose mask is all False skipped (no loads, no FLOPs, zeros stored). Chosen by
    ``"auto"`` on CUDA (and under the interpreter) when at least :data:`SKIP_TO_WIN` of its 128x128
    output tiles are all pruned: it then does that much less work, which pays for a Triton GEMM
    running below cuBLAS. Unstructured masks almost never empty a whole tile (at density 0.1 the
    chance is 0.9^16384), so they stay on cuBLAS. No GPU figure exists yet to move the threshold;
    ``benchmarks/bench_masked_linear.py`` measures both.

``W*M`` is never multiplied on a sparse module's hot path, and no float copy of the mask is kept
(the bool mask is read as bytes: 1 byte per weight).

Layers: ``@triton.jit`` kernel -> ``masked_linear_dw_launch`` (check, allocate, launch) ->
``_FusedMaskLinearFunction`` (autograd, kernel backend) or ``masked_weight`` + ``F.linear``
(vendor backend, torch's own autograd for the GEMMs) -> ``masked_linear`` (public). The reference
twin is ``masked_linear_reference``: ``F.linear(x, weight * mask, bias)``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from sparsekern.ops import _fresh
from sparsekern.ops._checks import check_bias
from sparsekern.ops._dispatch import use_kernels
from sparsekern.ops._launch import (
    KERNEL_DTYPES,
    as_rows,
    autocast_to,
    check_2d,
    dot_precision,
    interpreter_upcast,
    out_tensor,
)
from sparsekern.ops._mask_pass import zero_pruned, zero_pruned_
from sparsekern.ops._tiles import (
    FLAG_BLOCK,
    grouped_tile,
    skipped_tile_fraction,
    tile_configs,
    tile_flags,
    tile_kept_blocks,
)
from sparsekern.ops._triton import require_triton, tl, triton
from sparsekern.ops.masked_weight import check_mask, masked_weight_checked

__all__ = [
    "DW_BACKENDS",
    "SKIP_TO_WIN",
    "compile_specs",
    "dw_backend",
    "dw_backend_for",
    "masked_linear",
    "masked_linear_dw_launch",
    "masked_linear_reference",
    "masked_linear_trusted",
]

DW_BACKENDS = ("auto", "vendor", "kernel")
# "auto" takes the fused kernel when at least this fraction of its 128x128 dW tiles is all pruned:
# a Triton GEMM at ~0.8 of cuBLAS that skips 25% of its tiles costs 0.75/0.8 = 0.94 of cuBLAS.
SKIP_TO_WIN = 0.25
_backend = "auto"

# ---------------------------------------------------------------------------------------------
# Autotune configs (data, keyed on the GEMM shape M, N, K). Tuple: (BLOCK_M, BLOCK_N, BLOCK_K,
# GROUP_M, num_warps, num_stages). Hopper-sized tiles first; small tiles for LeNet sizes.
# ---------------------------------------------------------------------------------------------
_GPU_CONFIGS = {
    # C = (A @ B) * mask: dW [N_out, K_in], reduction over the (large) token dimension.
    "mask_c": [
        (128, 256, 64, 8, 8, 3),
        (256, 128, 64, 8, 8, 3),
        (128, 128, 64, 8, 8, 4),
        (128, 128, 32, 8, 4, 4),
        (128, 64, 64, 8, 4, 4),
        (64, 128, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 3),
        (32, 64, 64, 8, 4, 3),
    ],
}
# The benchmark shape of the static performance contract (benchmarks/NOTES.md): M=8192 tokens,
# N=K=4096, bf16; the configs the autotuner may pick there are "hot".
BENCH_SHAPE = {"tokens": 8192, "out": 4096, "in": 4096}
_HOT_MIN_TILE = 128 * 128


@triton.autotune(configs=tile_configs(_GPU_CONFIGS["mask_c"]), key=["M", "N", "K"])
@triton.jit
def _mm_mask_c_kernel(
    a_ptr, b_ptr, keep_ptr, flags_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_km, stride_kn,
    stride_cm, stride_cn,
    FLAG_M, FLAG_N,
    FLAG: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C[M, N] = (A[M, K] @ B[K, N]) * keep[M, N]; tiles whose flags are all 0 only store zeros.

    flags[FLAG_M, FLAG_N] (uint8, contiguous) says per FLAG x FLAG block of keep whether any entry
    is kept. Both operands reach the wgmma from shared memory and the mask is applied once, after
    the K loop, so the loads stay pipelined (``warp_group_dot_wait {pendings = 1}``)."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = offs_m < M
    col_ok = offs_n < N
    out_ok = row_ok[:, None] & col_ok[None, :]

    n_kept_blocks = tile_kept_blocks(
        flags_ptr, pid_m, pid_n, FLAG_M, FLAG_N, FLAG, BLOCK_M, BLOCK_N
    )

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if n_kept_blocks > 0:
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 is exact there
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        k_ptrs = keep_ptr + offs_m[:, None] * stride_km + offs_n[None, :] * stride_kn
        keep = tl.load(k_ptrs, mask=out_ok, other=0)
        acc = tl.where(keep != 0, acc, tl.zeros_like(acc))  # dW exactly 0 at pruned weights
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------------
# Launcher: check, allocate, launch. 2-D operands; ``out`` lets tests poison the output.
# ---------------------------------------------------------------------------------------------
def _grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def masked_linear_dw_launch(
    dy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``dW [N, K] = (dy [M, N]^T @ x [M, K]) * mask [N, K]``, skipping all-pruned tiles (any
    strides for ``dy`` and ``x``)."""
    require_triton("masked_linear's fused dW kernel")
    check_2d("masked_linear dweight", {"dy": dy, "x": x, "mask": mask}, x.dtype)
    M, N = dy.shape
    K = x.shape[1]
    dw = out_tensor(out, (N, K), x, x.dtype)
    if N == 0 or K == 0:
        return dw
    keep = mask.contiguous().view(torch.uint8)
    flags = tile_flags(mask)
    _mm_mask_c_kernel[_grid(N, K)](
        dy, x, keep, flags, dw,
        N, K, M,
        dy.stride(1), dy.stride(0),  # A[n, m] = dy[m, n]
        x.stride(0), x.stride(1),
        keep.stride(0), keep.stride(1),
        dw.stride(0), dw.stride(1),
        flags.shape[0], flags.shape[1],
        FLAG=FLAG_BLOCK, UPCAST=interpreter_upcast(x.dtype), PRECISION=dot_precision(x.dtype),
    )  # fmt: skip
    return dw


# ---------------------------------------------------------------------------------------------
# dW backend choice
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def dw_backend(name: str):
    """Within the block, masked_linear's dW uses backend ``name`` (``"auto"``, ``"vendor"`` or
    ``"kernel"``). ``"kernel"`` needs tensors the Triton kernels run on (CUDA, or the CPU under
    ``TRITON_INTERPRET=1``); elsewhere it falls back to ``"vendor"``."""
    global _backend
    if name not in DW_BACKENDS:
        raise ValueError(f"dw_backend: expected one of {DW_BACKENDS}, got {name!r}")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def dw_backend_for(x: torch.Tensor, mask: torch.Tensor) -> str:
    """The dW backend a call with these tensors takes now: ``"kernel"`` or ``"vendor"``."""
    if _backend == "vendor" or x.dtype not in KERNEL_DTYPES or not use_kernels(x):
        return "vendor"
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        # traceable torch ops (inductor fuses the where into its own kernels); torch.func's
        # transforms need the vendor path's setup_context form
        return "vendor"
    if _backend == "kernel":
        return "kernel"
    if dot_precision(x.dtype) == "ieee":
        return "vendor"  # true fp32 has no wgmma; its configs spill (sm_90: up to 199 STL)
    return "kernel" if skipped_tile_fraction(mask) >= SKIP_TO_WIN else "vendor"


def _fresh_dw_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The vendor dW goes into a pooled mapping (``_fresh``: CPU fp32, large weights, extension
    built), outside torch.compile and torch.func, whose traces need torch's own ops."""
    return (
        _fresh.fresh_ok(weight, weight.numel())
        and x.dtype == weight.dtype
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")  # dy would come back in the autocast dtype
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


def _fresh_dw(dy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(dy [M, N]^T @ x [M, K]) * mask`` on the vendor GEMM, written into a pooled huge-page
    mapping (``_fresh``: 33 against 55 ms for 9216 x 4096 from 64 rows), then the mask pass."""
    dw = _fresh.fresh_empty(tuple(mask.shape))
    torch.mm(dy.t(), x, out=dw)
    return zero_pruned_(dw, mask)


class _FusedMaskLinearFunction(torch.autograd.Function):
    """``F.linear(x, value, bias)`` with dW from the fused Triton kernel, or (``fresh``) from the
    vendor GEMM into a pooled mapping plus the mask pass (``value`` is the masked copy of
    ``weight``, or None for ``weight`` itself; ``dx = dy @ value`` on the vendor GEMM)."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, value, fresh=False):
        exact = value is not None  # None: the weight itself (the modules' invariant)
        value = value if exact else weight
        ctx.save_for_backward(x, weight, mask, value if exact else None)
        ctx.has_bias, ctx.exact, ctx.fresh = bias is not None, exact, fresh
        return F.linear(x, value, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mask, value = ctx.saved_tensors
        value = value if ctx.exact else weight
        dx = dw = db = None
        if torch.is_grad_enabled():  # create_graph: differentiable formulas on the saved inputs
            v = zero_pruned(weight, mask) if ctx.exact else weight
            if ctx.needs_input_grad[0]:
                dx = dy.matmul(v)
            if ctx.needs_input_grad[1]:
                dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
                dw = zero_pruned(dy2.t().matmul(x2), mask)
        else:
            if ctx.needs_input_grad[0]:
                dx = dy.matmul(value)
            if ctx.needs_input_grad[1]:
                launch = _fresh_dw if ctx.fresh else masked_linear_dw_launch
                dw = launch(as_rows(dy), as_rows(x), mask)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, dw, None, db, None, None


# ---------------------------------------------------------------------------------------------
# Reference twin and public op
# ---------------------------------------------------------------------------------------------
def masked_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain PyTorch: ``F.linear(x, weight * mask, bias)``, differentiable by torch's autograd."""
    return F.linear(x, weight * mask, bias)


def _check_inputs(x, weight, mask, bias) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"masked_linear: expected x as a floating-point tensor, got {got}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"masked_linear: expected weight 2-D [out_features, in_features], got {got}"
        )
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"masked_linear: expected x of shape [..., {weight.shape[1]}] (weight.shape[1]), got "
            f"{list(x.shape)}"
        )
    check_mask(mask, weight, "masked_linear")
    if x.dtype != weight.dtype:
        raise TypeError(
            f"masked_linear: expected x of weight's dtype {weight.dtype}, got {x.dtype}"
        )
    if x.device != weight.device:
        raise ValueError(
            f"masked_linear: expected x on the weight's device {weight.device}, got {x.device}"
        )
    check_bias("masked_linear", bias, weight.shape[0], x)


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    assume_pruned_zero: bool = False,
) -> torch.Tensor:
    """``y = x @ (weight * mask).T + bias``, autograd-aware.

    Args:
        x: ``[..., in_features]``, any strides, floating point.
        weight: ``[out_features, in_features]``, x's dtype and device.
        mask: ``[out_features, in_features]`` torch.bool; True keeps a weight.
        bias: ``[out_features]`` or None (any strides).
        assume_pruned_zero: the caller guarantees ``weight`` is exactly 0 where ``mask`` is False
            (the sparse modules' invariant): forward and dX then use ``weight`` as it is.
    Returns:
        ``[..., out_features]``. Pruned entries are ignored, NaN or inf included (``where``
        semantics). Gradients: ``dx = dy @ (weight*mask)``; ``dweight = (dy^T x) * mask``,
        exactly 0 where ``mask`` is False; ``dbias = dy.sum(...)``. Double backward works.

    Under ``torch.autocast`` the inputs are cast to the autocast dtype, as ``F.linear`` would.
    """
    x, weight, bias = autocast_to(x, weight, bias)
    _check_inputs(x, weight, mask, bias)
    needs_dw = torch.is_grad_enabled() and weight.requires_grad
    if needs_dw and dw_backend_for(x, mask) == "kernel":
        value = None if assume_pruned_zero else zero_pruned(weight.detach(), mask)
        return _FusedMaskLinearFunction.apply(x, weight, mask, bias, value)
    if needs_dw and _fresh_dw_applies(x, weight):
        value = None if assume_pruned_zero else zero_pruned(weight.detach(), mask)
        return _FusedMaskLinearFunction.apply(x, weight, mask, bias, value, True)
    if torch.compiler.is_compiling() and not assume_pruned_zero:
        w = zero_pruned(weight, mask)  # the cache is not traceable; inductor fuses this
    else:
        w = masked_weight_checked(weight, mask, assume_pruned_zero, needs_dw)
    return F.linear(x, w, bias)


def masked_linear_trusted(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """:func:`masked_linear` with ``assume_pruned_zero=True`` for a caller that owns ``weight``,
    ``mask`` and ``bias`` and has checked them (``SparseLinear``: the mask is checked against the
    weight whenever it changes, not per call); ``x`` is checked by ``F.linear``, as
    ``nn.Linear``'s is, and autocast is ``F.linear``'s own. Same values and gradients; what it
    saves per call is the public op's input checks (~10 us of Python on a loaded 2-core machine,
    measured). The fused-dW Triton backend takes the public op."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)
    if not isinstance(x, torch.Tensor) or dw_backend_for(x, mask) == "kernel":
        return masked_linear(x, weight, mask, bias, assume_pruned_zero=True)
    if _fresh_dw_applies(x, weight):
        return _FusedMaskLinearFunction.apply(x, weight, mask, bias, None, True)
    return F.linear(x, masked_weight_checked(weight, mask, True, True), bias)


# ---------------------------------------------------------------------------------------------
# Static performance contract (``python -m sparsekern.ops._compile_check``): every GPU config x
# dtype of the dW kernel, with the integer arguments' values at the benchmark shape.
# ---------------------------------------------------------------------------------------------
def compile_specs():
    """Yield one spec dict per (config, dtype) of ``_mm_mask_c_kernel``: ``name``, ``fn``,
    ``signature``, ``constexprs``, ``values`` (integer arguments at dW of M=8192 tokens,
    N=K=4096: ``dy [8192, 4096]`` read transposed, ``x [8192, 4096]``), ``num_warps``,
    ``num_stages``, ``hot`` (bf16 configs with tiles of at least 128x128, the ones the autotuner
    can pick at that shape)."""
    tokens, n_out, k_in = BENCH_SHAPE["tokens"], BENCH_SHAPE["out"], BENCH_SHAPE["in"]
    values = {
        "M": n_out, "N": k_in, "K": tokens,
        "stride_am": 1, "stride_ak": n_out,  # A[n, m] = dy[m, n]
        "stride_bk": k_in, "stride_bn": 1,
        "stride_km": k_in, "stride_kn": 1,
        "stride_cm": k_in, "stride_cn": 1,
        "FLAG_M": n_out // FLAG_BLOCK, "FLAG_N": k_in // FLAG_BLOCK,
    }  # fmt: skip
    for dt in ("bf16", "fp16", "fp32"):
        signature = {
            "a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "keep_ptr": "*u8", "flags_ptr": "*u8",
            "c_ptr": f"*{dt}",
        } | {k: "i32" for k in values}  # fmt: skip
        for bm, bn, bk, g, w, s in _GPU_CONFIGS["mask_c"]:
            consts = {"FLAG": FLAG_BLOCK, "UPCAST": False}
            consts |= {"PRECISION": "ieee" if dt == "fp32" else "tf32"}
            consts |= {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}
            yield {
                "name": f"masked_linear.dw[{dt},{bm}x{bn}x{bk},w{w},s{s}]",
                "fn": _mm_mask_c_kernel.fn,
                "signature": signature,
                "constexprs": consts,
                "values": values,
                "num_warps": w,
                "num_stages": s,
                "hot": dt == "bf16" and bm * bn >= _HOT_MIN_TILE,
            }
