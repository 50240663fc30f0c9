"""masked_linear: ``y = x (W*M)^T + b`` with the pruning mask fused into the GEMMs.

Three GEMMs, two Triton kernels:

* forward  ``y [M, N]  = x [M, K]  @ (W*M)^T``   ``_mm_mask_b_kernel`` (mask applied to the B tile
  as it is loaded, bias added in the epilogue)
* dX       ``dx [M, K] = dy [M, N] @ (W*M)``     the same kernel with other strides
* dW       ``dW [N, K] = (dy^T @ x) * M``        ``_mm_mask_c_kernel`` (mask applied in the
  epilogue; a tile whose mask is all False loads nothing and does no FLOPs, only stores zeros)

``W*M`` is never materialised and no elementwise pass over a weight-sized float tensor is made.

Mask representation (why no bit-packing): the kernels read the bool mask in place as bytes
(``mask.view(torch.uint8)``, zero-copy). Packing to bits would need a packing pass whenever the mask
changes and a shift-and-test per element in the inner loop, to save bytes that do not matter: at
M=8192, N=K=4096 bf16 the forward GEMM does 2*8192*4096*4096 = 275 GFLOP (about 0.4 ms at 700
TFLOP/s) while the whole mask is 16 MiB, about 5 us of HBM time at 3.35 TB/s (and W itself 32 MiB).
For dW-tile skipping the kernels also read per-tile flags: one byte per 16x16 block of the mask
(``FLAG_BLOCK``), i.e. 1/256 of the mask, so any tile shape that is a multiple of 16 can test
"is my tile all pruned?" with BLOCK_N/16 x BLOCK_K/16 byte loads. The flags are cached per mask
tensor and recomputed only when the mask changes (its ``_version`` moves), so steady-state training
makes no pass over the mask at all.

Layers: private ``@triton.jit`` kernels -> launchers (check, allocate, launch) -> ``torch.library``
custom ops (so ``torch.compile(fullgraph=True)`` sees opaque ops) -> ``MaskedLinearFunction``
(autograd) -> ``masked_linear`` (public). ``masked_linear_reference`` is the plain-PyTorch twin
(the CPU path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sparsekern.ops._dispatch import interpreter_enabled, use_kernels
from sparsekern.ops._mask_cache import cached_on_mask, float_mask

__all__ = [
    "masked_linear",
    "masked_linear_reference",
    "MaskedLinearFunction",
    "masked_linear_fwd_launch",
    "masked_linear_dx_launch",
    "masked_linear_dw_launch",
    "tile_flags",
    "FLAG_BLOCK",
]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLAG_BLOCK = 16  # granularity of the per-tile "anything kept?" flags; every BLOCK_* is a multiple

# ---------------------------------------------------------------------------------------------
# Autotune configs (data, keyed on the GEMM shape M, N, K). The interpreter gets exactly one config:
# with more, triton's autotuner tries to benchmark and fails on a machine without a GPU.
# Tuple: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).
# ---------------------------------------------------------------------------------------------
_GPU_CONFIGS = {
    # C = A @ (B*mask): forward and dX. Hopper-friendly tiles first; small tiles for LeNet sizes.
    "mask_b": [
        (128, 256, 64, 8, 8, 3),
        (256, 128, 64, 8, 8, 3),
        (128, 128, 64, 8, 8, 4),
        (128, 128, 32, 8, 4, 4),
        (128, 64, 64, 8, 4, 4),
        (64, 128, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 3),
        (32, 64, 64, 8, 4, 3),
        (64, 32, 64, 8, 4, 3),
    ],
    # C = (A @ B) * mask: dW, reduction over the (large) batch dimension.
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
_INTERPRETER_CONFIG = (32, 32, 32, 4, 4, 1)


def tile_configs(gpu_rows, interpreter_row=_INTERPRETER_CONFIG) -> list[triton.Config]:
    """``triton.Config`` objects from ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
    num_stages)`` rows; under the interpreter only ``interpreter_row``."""
    rows = [interpreter_row] if interpreter_enabled() else gpu_rows
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g},
            num_warps=w,
            num_stages=s,
        )
        for bm, bn, bk, g, w, s in rows
    ]


def _configs(kind: str) -> list[triton.Config]:
    return tile_configs(_GPU_CONFIGS[kind])


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the 1-D program id to a (pid_m, pid_n) tile, GROUP_M row-tiles at a time, so that
    consecutive programs share B tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.autotune(configs=_configs("mask_b"), key=["M", "N", "K"])
@triton.jit
def _mm_mask_b_kernel(
    a_ptr, b_ptr, keep_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_kk, stride_kn,
    stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C[M, N] = A[M, K] @ (B[K, N] * keep[K, N]) (+ bias[N]); keep is the mask as bytes."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # int64 row/col offsets: M*stride can pass 2^31 for large activations.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    row_ok = offs_m < M
    col_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    k_ptrs = keep_ptr + offs_k[:, None] * stride_kk + offs_n[None, :] * stride_kn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_ok = k_ok[:, None] & col_ok[None, :]
        b = tl.load(b_ptrs, mask=b_ok, other=0.0)
        keep = tl.load(k_ptrs, mask=b_ok, other=0)
        b = tl.where(keep != 0, b, tl.zeros_like(b))  # the fused mask: W*M never exists
        if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 is exact there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        k_ptrs += BLOCK_K * stride_kk
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _tile_kept_blocks(
    flags_ptr, pid_m, pid_n, FLAG_M, FLAG_N,
    FLAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """How many FLAG x FLAG blocks of output tile (pid_m, pid_n) keep anything: the tile's
    ``BLOCK_M/FLAG x BLOCK_N/FLAG`` bytes of ``flags [FLAG_M, FLAG_N]`` (uint8, contiguous)."""
    fm = pid_m * (BLOCK_M // FLAG) + tl.arange(0, BLOCK_M // FLAG)
    fn = pid_n * (BLOCK_N // FLAG) + tl.arange(0, BLOCK_N // FLAG)
    f_ok = (fm[:, None] < FLAG_M) & (fn[None, :] < FLAG_N)
    flags = tl.load(flags_ptr + fm[:, None] * FLAG_N + fn[None, :], mask=f_ok, other=0)
    return tl.sum(tl.sum(flags.to(tl.int32), axis=1), axis=0)


@triton.autotune(configs=_configs("mask_c"), key=["M", "N", "K"])
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
    is kept."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = offs_m < M
    col_ok = offs_n < N
    out_ok = row_ok[:, None] & col_ok[None, :]

    n_kept_blocks = _tile_kept_blocks(
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
            if UPCAST:
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
# Tile flags, cached per mask tensor object and invalidated by its version counter.
# ---------------------------------------------------------------------------------------------
def _compute_tile_flags(mask: torch.Tensor) -> torch.Tensor:
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
    rows, cols = m.shape
    pad_r, pad_c = (-rows) % FLAG_BLOCK, (-cols) % FLAG_BLOCK
    if pad_r or pad_c:
        m = F.pad(m, (0, pad_c, 0, pad_r))
    fr, fc = m.shape[0] // FLAG_BLOCK, m.shape[1] // FLAG_BLOCK
    return m.reshape(fr, FLAG_BLOCK, fc, FLAG_BLOCK).amax(dim=(1, 3)).contiguous()


def tile_flags(mask: torch.Tensor) -> torch.Tensor:
    """``flags [ceil(N/16), ceil(K/16)]`` uint8: 1 where the 16x16 block of ``mask [N, K]`` keeps
    anything. Cached on the mask object; recomputed when the mask is modified in place."""
    return cached_on_mask(mask, "tile_flags", _compute_tile_flags)


# ---------------------------------------------------------------------------------------------
# Launchers: check, allocate, launch. 2-D operands; ``out`` lets tests poison the output.
# ---------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    # fp32 operands use TF32 only when torch allows it for cuBLAS too (off by default), so "fp32"
    # means the same precision in both. 16-bit operands ignore it; they keep Triton's default.
    tf32_ok = torch.backends.cuda.matmul.allow_tf32 and not interpreter_enabled()
    return "ieee" if dtype == torch.float32 and not tf32_ok else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return interpreter_enabled() and dtype == torch.bfloat16


def _check_launch(name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: kernels take float16, bfloat16 or float32, got {dtype}")
    devices = {k: t.device for k, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {devices}")
    for k, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"{name}: {k} must be 2-D, got shape {tuple(t.shape)}")


def _out(
    out: torch.Tensor | None, shape: tuple[int, int], like: torch.Tensor, dtype
) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=like.device, dtype=dtype)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != like.device:
        raise ValueError(
            f"out: expected shape {shape}, dtype {dtype}, device {like.device}; got "
            f"{tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    return out


def _grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def masked_linear_fwd_launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ (weight [N, K] * mask [N, K])^T + bias [N]``."""
    _check_launch("masked_linear forward", {"x": x, "weight": weight, "mask": mask}, x.dtype)
    M, K = x.shape
    N = weight.shape[0]
    y = _out(out, (M, N), x, x.dtype)
    if M == 0 or N == 0:
        return y
    keep = mask.view(torch.uint8)
    _mm_mask_b_kernel[_grid(M, N)](
        x, weight, keep, bias if bias is not None else x, y,
        M, N, K,
        x.stride(0), x.stride(1),
        weight.stride(1), weight.stride(0),  # B[k, n] = W[n, k]
        keep.stride(1), keep.stride(0),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
    )  # fmt: skip
    return y


def masked_linear_dx_launch(
    dy: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``dx [M, K] = dy [M, N] @ (weight [N, K] * mask [N, K])``."""
    _check_launch("masked_linear dx", {"dy": dy, "weight": weight, "mask": mask}, dy.dtype)
    M, N = dy.shape
    K = weight.shape[1]
    dx = _out(out, (M, K), dy, dy.dtype)
    if M == 0 or K == 0:
        return dx
    keep = mask.view(torch.uint8)
    _mm_mask_b_kernel[_grid(M, K)](
        dy, weight, keep, dy, dx,
        M, K, N,
        dy.stride(0), dy.stride(1),
        weight.stride(0), weight.stride(1),  # B[n, k] = W[n, k]
        keep.stride(0), keep.stride(1),
        dx.stride(0), dx.stride(1),
        HAS_BIAS=False, UPCAST=_upcast(dy.dtype), PRECISION=_precision(dy.dtype),
    )  # fmt: skip
    return dx


def masked_linear_dw_launch(
    dy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``dW [N, K] = (dy [M, N]^T @ x [M, K]) * mask [N, K]``, skipping all-pruned tiles."""
    _check_launch("masked_linear dweight", {"dy": dy, "x": x, "mask": mask}, x.dtype)
    M, N = dy.shape
    K = x.shape[1]
    dw = _out(out, (N, K), x, x.dtype)
    if N == 0 or K == 0:
        return dw
    keep = mask.view(torch.uint8)
    flags = tile_flags(mask)
    _mm_mask_c_kernel[_grid(N, K)](
        dy, x, keep, flags, dw,
        N, K, M,
        dy.stride(1), dy.stride(0),  # A[n, m] = dy[m, n]
        x.stride(0), x.stride(1),
        keep.stride(0), keep.stride(1),
        dw.stride(0), dw.stride(1),
        flags.shape[0], flags.shape[1],
        FLAG=FLAG_BLOCK, UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
    )  # fmt: skip
    return dw


# ---------------------------------------------------------------------------------------------
# Reference twin (the CPU path, and the float64 fallback).
# ---------------------------------------------------------------------------------------------
def masked_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain PyTorch: ``F.linear(x, weight * mask, bias)``. Differentiable by torch's autograd."""
    return F.linear(x, _apply_mask(weight, mask), bias)


def _apply_mask(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # A multiply by the cached 0/1 copy of the mask: vectorised on the CPU, 4x cheaper than
    # torch.where or a bool multiply (see _mask_cache.float_mask). Exact: w * 1 = w, w * 0 = 0
    # (a pruned inf/nan weight would give nan, but the mask invariant keeps pruned weights at 0).
    return t * float_mask(mask, t.dtype)


def _ref_dx(dy2: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return dy2 @ _apply_mask(weight, mask)


def _ref_dw(dy2: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (dy2.t() @ x2).mul_(float_mask(mask, dy2.dtype))


def _kernels_for(*tensors: torch.Tensor) -> bool:
    return use_kernels(*tensors) and tensors[0].dtype in KERNEL_DTYPES


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., C] -> [rows, C]``, contiguous (a no-op for the usual 2-D contiguous input)."""
    if t.dim() != 2:
        t = t.reshape(-1, t.shape[-1])
    return t if t.is_contiguous() else t.contiguous()


# Implementations on [..., K] inputs, shared by eager mode and the custom ops.
def _fwd_kernels(x, weight, mask, bias):
    y = masked_linear_fwd_launch(_rows(x), weight, mask, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _fwd_impl(x, weight, mask, bias):
    if not _kernels_for(x, weight, mask):
        return masked_linear_reference(x, weight, mask, bias)
    return _fwd_kernels(x, weight, mask, bias)


def _dx_impl(dy, weight, mask):
    dy2 = _rows(dy)
    if _kernels_for(dy2, weight, mask):
        dx = masked_linear_dx_launch(dy2, weight, mask)
    else:
        dx = _ref_dx(dy2, weight, mask)
    return dx if dy.dim() == 2 else dx.reshape(*dy.shape[:-1], weight.shape[1])


def _dw_impl(dy, x, mask):
    dy2, x2 = _rows(dy), _rows(x)
    if _kernels_for(x2, dy2, mask):
        return masked_linear_dw_launch(dy2, x2, mask)
    return _ref_dw(dy2, x2, mask)


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile, so fullgraph=True traces a model of
# SparseLinear layers without stepping into Triton.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("sparsekern::masked_linear_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _fwd_impl(x, weight, mask, bias)


@_fwd_op.register_fake
def _(x, weight, mask, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("sparsekern::masked_linear_dx", mutates_args=())
def _dx_op(dy: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _dx_impl(dy, weight, mask)


@_dx_op.register_fake
def _(dy, weight, mask):
    return dy.new_empty((*dy.shape[:-1], weight.shape[1]))


@torch.library.custom_op("sparsekern::masked_linear_dw", mutates_args=())
def _dw_op(dy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _dw_impl(dy, x, mask)


@_dw_op.register_fake
def _(dy, x, mask):
    return x.new_empty(tuple(mask.shape))


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class MaskedLinearFunction(torch.autograd.Function):
    """Autograd for ``masked_linear``. In eager mode the implementations are called directly
    (the dispatcher round trip of a custom op costs tens of microseconds per call, as much as a
    LeNet-sized GEMM on the CPU); under torch.compile the custom ops are used. The classic
    ``forward(ctx, ...)`` form on purpose: with a separate ``setup_context``, ``apply`` binds
    default arguments through ``inspect.signature`` on every call (~100 us of Python)."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias):
        ctx.has_bias = bias is not None
        ctx.masked_weight = False
        if _compiling():
            y = torch.ops.sparsekern.masked_linear_fwd(x, weight, mask, bias)
        elif _kernels_for(x, weight, mask):
            y = _fwd_kernels(x, weight, mask, bias)
        else:
            # Reference path: keep W*M for dx, as torch's own autograd of F.linear(x, W*M) does;
            # recomputing it costs a weight-sized multiply and allocation per step (~60-230 us
            # at 300x784 on the CPU), more than the whole target budget of 10% over dense.
            wm = _apply_mask(weight, mask)
            y = F.linear(x, wm, bias)
            ctx.save_for_backward(x, wm, mask)
            ctx.masked_weight = True
            return y
        ctx.save_for_backward(x, weight, mask)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mask = ctx.saved_tensors
        dx = dw = db = None
        compiling = _compiling()
        if ctx.needs_input_grad[0]:
            if compiling:
                dx = torch.ops.sparsekern.masked_linear_dx(dy, weight, mask)
            elif ctx.masked_weight:  # weight is W*M already
                dx = dy @ weight
            else:
                dx = _dx_impl(dy, weight, mask)
        if ctx.needs_input_grad[1]:
            if compiling:
                dw = torch.ops.sparsekern.masked_linear_dw(dy, x, mask)
            else:
                dw = _dw_impl(dy, x, mask)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, dw, None, db


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------
def _check_inputs(x, weight, mask, bias) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"masked_linear: x must be a floating-point tensor, got {got}")
    if x.dim() < 1:
        raise ValueError(
            f"masked_linear: x must have shape [..., in_features], got {tuple(x.shape)}"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"masked_linear: weight must be 2-D [out_features, in_features], got shape "
            f"{tuple(weight.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"masked_linear: x's last dim must equal weight.shape[1] = {weight.shape[1]}, got x "
            f"shape {tuple(x.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"masked_linear: mask must be torch.bool, got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(
            f"masked_linear: mask must have the weight's shape {tuple(weight.shape)}, got "
            f"{tuple(mask.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(
            f"masked_linear: x and weight dtypes differ: x {x.dtype}, weight {weight.dtype}"
        )
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"masked_linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
        if bias.dtype != x.dtype:
            raise TypeError(f"masked_linear: bias dtype must be {x.dtype}, got {bias.dtype}")
    devices = {"x": x.device, "weight": weight.device, "mask": mask.device}
    if bias is not None:
        devices["bias"] = bias.device
    if len(set(devices.values())) != 1:
        names = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"masked_linear: all tensors must be on one device, got {names}")


def masked_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x @ (weight * mask).T + bias`` with the mask fused into the kernels.

    Args:
        x: ``[..., in_features]`` float16, bfloat16 or float32 (float64 runs the reference).
        weight: ``[out_features, in_features]``, x's dtype.
        mask: ``[out_features, in_features]`` torch.bool; True keeps a weight.
        bias: ``[out_features]`` or None.
    Returns:
        ``[..., out_features]``. Gradients: ``dx = dy @ (weight*mask)``,
        ``dweight = (dy^T x) * mask`` (exactly 0 where mask is False), ``dbias = dy.sum``.

    Under ``torch.autocast`` the inputs are cast to the autocast dtype, as ``F.linear`` would.
    """
    dev = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(dev) and x.is_floating_point():
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    _check_inputs(x, weight, mask, bias)
    return MaskedLinearFunction.apply(x, weight, mask, bias)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every GPU config x dtype, compiled for real GPU targets on a
# machine without one by ``python -m sparsekern.ops._compile_check`` (catches what the
# interpreter accepts and the compiler refuses: dot shapes, dtype mixes, shared-memory overflow).
# ---------------------------------------------------------------------------------------------
def compile_specs():
    """Yield ``(name, jit_fn, signature, constexprs, num_warps, num_stages)`` for each kernel
    config and dtype; signatures list the kernels' arguments in order."""
    dims = {"M": "i32", "N": "i32", "K": "i32"}
    ab = ("stride_am", "stride_ak", "stride_bk", "stride_bn")
    for dt in ("bf16", "fp16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        ptrs = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "keep_ptr": "*u8"}
        specs = {
            "mask_b": (
                _mm_mask_b_kernel,
                {**ptrs, "bias_ptr": f"*{dt}", "c_ptr": f"*{dt}", **dims}
                | {s: "i32" for s in (*ab, "stride_kk", "stride_kn", "stride_cm", "stride_cn")},
                {"HAS_BIAS": True},
            ),
            "mask_c": (
                _mm_mask_c_kernel,
                {**ptrs, "flags_ptr": "*u8", "c_ptr": f"*{dt}", **dims}
                | {s: "i32" for s in (*ab, "stride_km", "stride_kn", "stride_cm", "stride_cn")}
                | {"FLAG_M": "i32", "FLAG_N": "i32"},
                {"FLAG": FLAG_BLOCK},
            ),
        }
        for kind, (kernel, sig, extra) in specs.items():
            for bm, bn, bk, g, w, s in _GPU_CONFIGS[kind]:
                consts = {**extra, "UPCAST": False, "PRECISION": prec}
                consts |= {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}
                name = f"masked_linear.{kind}[{dt},{bm}x{bn}x{bk},w{w},s{s}]"
                yield name, kernel.fn, sig, consts, w, s
