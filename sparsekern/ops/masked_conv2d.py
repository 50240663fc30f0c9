"""Masked 2-D convolution: ``y = conv2d(x, weight * mask) + bias`` with the mask fused into
implicit-GEMM Triton kernels, and a weight gradient that is exactly zero where ``mask`` is False.

Shapes (PyTorch's): ``x [N, C_in, H, W]`` (or unbatched ``[C_in, H, W]``),
``weight [C_out, C_in / groups, kH, kW]``, ``mask`` bool of ``weight``'s shape, ``bias [C_out]``,
``y [N, C_out, H_out, W_out]``.

Three implicit GEMMs (im2col is never materialised: each kernel computes the patch addresses of
its tile from the GEMM indices, and out-of-image taps - the padding - are load masks):

* forward ``y[(n,oh,ow), co] = sum_{(ci,kh,kw)} x[n, ci, oh*s-p+kh*d, ow*s-p+kw*d]
  * (W*M)[co, (ci,kh,kw)]``: ``_conv_fwd_kernel``, GEMM ``[N*OH*OW, C_in*kH*kW] @ [.., C_out]``,
  the mask applied to the weight tile as it is loaded, bias in the epilogue.
* dX ``dx[(n,ih,iw), ci] = sum_{(co,kh,kw)} dy[n, co, oh, ow] * (W*M)[co, ci, kh, kw]`` with
  ``oh = (ih + p - kh*d) / s``: ``_conv_dx_kernel``, the GATHER form. A tap contributes only when
  ``ih + p - kh*d`` is >= 0, divisible by the stride and ``< s*OH``; that test is the load mask of
  the dy tile. Why gather rather than scatter (the transposed forward with atomics): every dx
  element is written once by one program (no atomics, deterministic, no zero-fill pass), and the
  same kernel shape as the forward. Cost: at stride s the mask rejects all but 1/(sH*sW) of the
  reduction, so a strided layer's dX does sH*sW times the useful FLOPs (16x at AlexNet's conv1,
  whose dX is not needed for an input image anyway; every other AlexNet/VGG-16 conv is stride 1,
  where nothing is wasted). A sub-pixel split (one GEMM per (ih % s, iw % s) phase) would remove
  that waste; not done.
* dW ``dW[co, (ci,kh,kw)] = sum_{(n,oh,ow)} dy[n, co, oh, ow] * x_patch[(n,oh,ow), (ci,kh,kw)]``:
  ``_conv_dw_kernel``, the mask applied in the epilogue (exactly zero at pruned weights), tiles
  whose 16x16 flag blocks of the ``[C_out, C_in*kH*kW]`` mask view are all False skipped (no loads,
  no FLOPs, zeros stored), as ``masked_linear``'s dW does. The reduction ``N*OH*OW`` is long
  (VGG-16 conv1_1 at batch 64: 3.2 M) while the output is small (64 x 27), so the reduction is
  split over a second grid axis into fp32 partials summed afterwards (split-K, deterministic).

Layout: NCHW in and out and NCHW inside (any strides are accepted and passed to the kernels, so a
channels-last tensor also runs, without a copy). With NCHW the GEMM rows (n, oh, ow) of a stride-1
conv are consecutive addresses, so a tile's loads are coalesced along the rows; channels-last would
make the reduction dimension contiguous (and allow wide vector loads) but costs two layout passes
per call on NCHW models; not measured (no GPU was lent to this work), so not done.

The im2col address arithmetic lives in small ``@triton.jit`` helpers (``_rows_nhw``,
``_cols_ckk``, ``_load_patch``, ``_load_dy_gather``) so that a block-sparse variant can reuse it
and differ only in which weight tiles it visits.

Precision: fp32/fp16/bf16 operands, fp32 accumulation. fp32 operands use TF32 exactly when
``F.conv2d`` would (``torch.backends.cudnn.allow_tf32``, True by default), so the kernels match the
dense conv they replace; turn it off for true fp32.

groups > 1 (grouped, depthwise) runs the plain-PyTorch reference on every device: the kernels
take groups=1 only (a group axis is pointer offsets plus per-group tile flags; depthwise as a GEMM
with N = 1 would waste 15/16 of every 16-wide dot anyway). float64 also runs the reference.
Dispatch as ``masked_linear``: CUDA -> kernels; CPU -> reference unless ``TRITON_INTERPRET=1``.

Layers: private ``@triton.jit`` kernels -> launchers (check, allocate, launch; ``out=``) ->
``torch.library`` custom ops (used under torch.compile, so ``fullgraph=True`` works) ->
``_MaskedConv2dFn`` (autograd; eager mode calls the implementations directly) -> ``masked_conv2d``
(public: validation, padding forms, unbatched input, autocast). ``masked_conv2d_reference`` is the
one-line definition the tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from sparsekern.ops._dispatch import interpreter_enabled, use_kernels
from sparsekern.ops._mask_cache import cached_on_mask
from sparsekern.ops.masked_linear import (
    FLAG_BLOCK,
    KERNEL_DTYPES,
    _compute_tile_flags,
    _grouped_tile,
    _tile_kept_blocks,
    _upcast,
    tile_configs,
)

__all__ = [
    "masked_conv2d",
    "masked_conv2d_reference",
    "masked_conv2d_fwd_launch",
    "masked_conv2d_dx_launch",
    "masked_conv2d_dw_launch",
    "conv_tile_flags",
    "compile_specs",
]

_IntOrPair = int | Sequence[int]

# ---------------------------------------------------------------------------------------------
# Autotune configs (data, keyed on the GEMM shape M, N, K). The interpreter gets exactly one config
# (with more, the autotuner benchmarks, which fails without a GPU).
# Tuple: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). BLOCK_M and BLOCK_N of "dw"
# are multiples of FLAG_BLOCK (16) for the tile-skip flags; every dim >= 16 for tl.dot.
# ---------------------------------------------------------------------------------------------
_GPU_CONFIGS = {
    # forward: M = N*OH*OW (10^5..10^7 rows), N = C_out (64..512), K = C_in*kH*kW (27..4608).
    "fwd": [
        (128, 128, 64, 8, 8, 3),
        (128, 128, 32, 8, 4, 4),
        (128, 64, 32, 8, 4, 4),
        (64, 128, 32, 8, 4, 4),
        (128, 64, 64, 8, 4, 3),
        (64, 64, 32, 8, 4, 4),
        (64, 64, 16, 8, 4, 3),  # conv1-like K = 27 (VGG) or 363 (AlexNet): little K to pipeline
    ],
    # dX: M = N*H*W, N = C_in, K = C_out*kH*kW.
    "dx": [
        (128, 128, 64, 8, 8, 3),
        (128, 128, 32, 8, 4, 4),
        (128, 64, 32, 8, 4, 4),
        (64, 128, 32, 8, 4, 4),
        (64, 64, 32, 8, 4, 4),
        (64, 32, 32, 8, 4, 3),  # C_in = 3 (first layers, if their dX is asked for)
    ],
    # dW: M = C_out, N = C_in*kH*kW, reduction N*OH*OW split over the second grid axis.
    "dw": [
        (128, 128, 64, 8, 8, 3),
        (128, 128, 32, 8, 4, 4),
        (128, 64, 64, 8, 4, 3),
        (64, 128, 64, 8, 4, 3),
        (64, 64, 64, 8, 4, 3),
        (64, 32, 64, 8, 4, 3),
    ],
}
_INTERPRETER_CONFIG = (32, 32, 32, 4, 4, 1)
# dW split-K: aim for about this many programs (2-4 waves on H100's 132 SMs) with tiles of about
# _DW_NOMINAL_TILE^2, and give every split at least _DW_MIN_CHUNK reduction rows.
_DW_TARGET_PROGRAMS = 4 * 132
_DW_NOMINAL_TILE = 128
_DW_MIN_CHUNK = 1024


def _configs(kind: str) -> list[triton.Config]:
    return tile_configs(_GPU_CONFIGS[kind], _INTERPRETER_CONFIG)


# ---------------------------------------------------------------------------------------------
# im2col address helpers (shared by the kernels; a block-sparse variant reuses them).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rows_nhw(offs, OH, OW):
    """GEMM index -> ``(n, h, w)`` of an ``[N, *, OH, OW]`` tensor: ``offs = (n*OH + h)*OW + w``."""
    w = offs % OW
    t = offs // OW
    h = t % OH
    n = t // OH
    return n, h, w


@triton.jit
def _cols_ckk(offs, KH, KW):
    """GEMM index -> ``(c, kh, kw)`` of a ``[*, C, KH, KW]`` weight: ``offs = (c*KH + kh)*KW + kw``,
    the order of a contiguous weight's rows (weight and mask tiles are contiguous along it)."""
    kw = offs % KW
    t = offs // KW
    kh = t % KH
    c = t // KH
    return c, kh, kw


@triton.jit
def _load_patch(
    x_ptr, row_base, ih0, iw0, row_ok, c, dh, dw, col_ok, H, W, sx_c, sx_h, sx_w,
):  # fmt: skip
    """The im2col tile ``A[r, k] = x[n_r, c_k, ih0_r + dh_k, iw0_r + dw_k]``, zero outside the image
    (the zero padding) and outside ``row_ok x col_ok``. ``row_base = n*sx_n + ih0*sx_h + iw0*sx_w``
    (int64; may point before the tensor for padded taps, which the mask never loads)."""
    ih = ih0[:, None] + dh[None, :]
    iw = iw0[:, None] + dw[None, :]
    ok = row_ok[:, None] & col_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    offs = row_base[:, None] + (c * sx_c + dh * sx_h + dw * sx_w)[None, :]
    return tl.load(x_ptr + offs, mask=ok, other=0.0)


@triton.jit
def _load_dy_gather(
    dy_ptr, n, ih, iw, row_ok, co, dh, dw, col_ok,
    OH, OW, stride_h, stride_w, pad_h, pad_w, sdy_n, sdy_c, sdy_h, sdy_w,
):  # fmt: skip
    """dX's gather tile ``A[r, k] = dy[n_r, co_k, oh, ow]`` with ``oh = (ih_r + pad_h - dh_k) /
    stride_h`` (ow likewise), zero where that is not a whole number in ``[0, OH)``: the input pixel
    ``ih`` is not touched by tap ``dh`` of any output row."""
    th = ih[:, None] + pad_h - dh[None, :]
    tw = iw[:, None] + pad_w - dw[None, :]
    ok = row_ok[:, None] & col_ok[None, :] & (th >= 0) & (tw >= 0)
    ok = ok & (th % stride_h == 0) & (tw % stride_w == 0)  # on negatives: masked by th >= 0
    oh = th // stride_h
    ow = tw // stride_w
    ok = ok & (oh < OH) & (ow < OW)
    offs = (n * sdy_n)[:, None] + (co * sdy_c)[None, :] + oh * sdy_h + ow * sdy_w
    return tl.load(dy_ptr + offs, mask=ok, other=0.0)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs("fwd"), key=["M", "N", "K"])
@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, keep_ptr, bias_ptr, y_ptr,
    M, N, K,
    H, W, OH, OW, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_c, sw_h, sw_w,
    sk_o, sk_c, sk_h, sk_w,
    sy_n, sy_c, sy_h, sy_w,
    HAS_BIAS: tl.constexpr,
    FLAT_W: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``y[n, co, oh, ow]``: GEMM ``[M = N*OH*OW, K = C_in*KH*KW] @ (W*mask)^T [K, N = C_out]``
    (+ bias[co]); keep is the mask as bytes, with the weight's 4-D strides."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # int64 indices: N*C*H*W passes 2^31 for large activations (e.g. 256 x 64 x 224 x 224).
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = offs_m < M
    col_ok = offs_n < N
    n, oh, ow = _rows_nhw(offs_m, OH, OW)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = n * sx_n + ih0 * sx_h + iw0 * sx_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = offs_k < K
        ci, kh, kw = _cols_ckk(offs_k, KH, KW)
        a = _load_patch(
            x_ptr, x_row, ih0, iw0, row_ok, ci, kh * dil_h, kw * dil_w, k_ok, H, W, sx_c, sx_h, sx_w
        )
        b_ok = k_ok[:, None] & col_ok[None, :]
        if FLAT_W:  # contiguous weight and mask: the (ci, kh, kw) offset is k itself, and the
            # compiler sees the tiles contiguous along k (vector loads)
            w_offs = offs_k[:, None] + (offs_n * sw_o)[None, :]
            k_offs = offs_k[:, None] + (offs_n * sk_o)[None, :]
        else:
            w_offs = (ci * sw_c + kh * sw_h + kw * sw_w)[:, None] + (offs_n * sw_o)[None, :]
            k_offs = (ci * sk_c + kh * sk_h + kw * sk_w)[:, None] + (offs_n * sk_o)[None, :]
        b = tl.load(w_ptr + w_offs, mask=b_ok, other=0.0)
        keep = tl.load(keep_ptr + k_offs, mask=b_ok, other=0)
        b = tl.where(keep != 0, b, tl.zeros_like(b))  # the fused mask: W*M never exists
        if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 is exact there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    y_offs = (n * sy_n + oh * sy_h + ow * sy_w)[:, None] + (offs_n * sy_c)[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_configs("dx"), key=["M", "N", "K"])
@triton.jit
def _conv_dx_kernel(
    dy_ptr, w_ptr, keep_ptr, dx_ptr,
    M, N, K,
    H, W, OH, OW, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sw_o, sw_c, sw_h, sw_w,
    sk_o, sk_c, sk_h, sk_w,
    sdx_n, sdx_c, sdx_h, sdx_w,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``dx[n, ci, ih, iw]``: GEMM ``[M = N*H*W, K = C_out*KH*KW] @ (W*mask) [K, N = C_in]``, the
    dy operand gathered (``_load_dy_gather``)."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = offs_m < M
    col_ok = offs_n < N
    n, ih, iw = _rows_nhw(offs_m, H, W)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = offs_k < K
        co, kh, kw = _cols_ckk(offs_k, KH, KW)
        a = _load_dy_gather(
            dy_ptr, n, ih, iw, row_ok, co, kh * dil_h, kw * dil_w, k_ok,
            OH, OW, stride_h, stride_w, pad_h, pad_w, sdy_n, sdy_c, sdy_h, sdy_w,
        )  # fmt: skip
        b_ok = k_ok[:, None] & col_ok[None, :]
        b = tl.load(
            w_ptr + (co * sw_o + kh * sw_h + kw * sw_w)[:, None] + (offs_n * sw_c)[None, :],
            mask=b_ok,
            other=0.0,
        )
        keep = tl.load(
            keep_ptr + (co * sk_o + kh * sk_h + kw * sk_w)[:, None] + (offs_n * sk_c)[None, :],
            mask=b_ok,
            other=0,
        )
        b = tl.where(keep != 0, b, tl.zeros_like(b))
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    dx_offs = (n * sdx_n + ih * sdx_h + iw * sdx_w)[:, None] + (offs_n * sdx_c)[None, :]
    tl.store(
        dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :]
    )


@triton.autotune(configs=_configs("dw"), key=["M", "N", "R", "CHUNK"])
@triton.jit
def _conv_dw_kernel(
    dy_ptr, x_ptr, keep_ptr, flags_ptr, c_ptr,
    M, N, R, CHUNK,
    H, W, OH, OW, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sx_n, sx_c, sx_h, sx_w,
    sk_o, sk_c, sk_h, sk_w,
    stride_cs, stride_cm,
    FLAG_M, FLAG_N,
    FLAG: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``C[s, co, k] = (sum over r in split s of dy[r, co] * patch[r, k]) * keep[co, k]``: the dW
    GEMM ``[M = C_out, R = N*OH*OW] @ [R, N = C_in*KH*KW]``, split s (grid axis 1) taking
    reduction rows ``[s*CHUNK, (s+1)*CHUNK)``. ``C`` is ``[splits, M, N]``, unit column stride.
    Tiles whose flags (``[FLAG_M, FLAG_N]`` uint8, per FLAG x FLAG block of the ``[M, N]`` mask
    view) are all 0 load nothing and store zeros."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = offs_m < M
    col_ok = offs_n < N
    out_ok = row_ok[:, None] & col_ok[None, :]

    n_kept_blocks = _tile_kept_blocks(
        flags_ptr, pid_m, pid_n, FLAG_M, FLAG_N, FLAG, BLOCK_M, BLOCK_N
    )

    ci, kh, kw = _cols_ckk(offs_n, KH, KW)  # the tile's weight columns, fixed over the reduction
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if n_kept_blocks > 0:
        dh = kh * dil_h
        dw = kw * dil_w
        r_start = pid_s.to(tl.int64) * CHUNK
        r_end = tl.minimum(r_start + CHUNK, R)
        for r0 in range(r_start, r_end, BLOCK_K):
            offs_r = r0 + tl.arange(0, BLOCK_K).to(tl.int64)
            r_ok = offs_r < r_end
            n, oh, ow = _rows_nhw(offs_r, OH, OW)
            a_offs = (offs_m * sdy_c)[:, None] + (n * sdy_n + oh * sdy_h + ow * sdy_w)[None, :]
            a = tl.load(dy_ptr + a_offs, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            ih0 = oh * stride_h - pad_h
            iw0 = ow * stride_w - pad_w
            x_row = n * sx_n + ih0 * sx_h + iw0 * sx_w
            b = _load_patch(
                x_ptr, x_row, ih0, iw0, r_ok, ci, dh, dw, col_ok, H, W, sx_c, sx_h, sx_w
            )
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        k_offs = (offs_m * sk_o)[:, None] + (ci * sk_c + kh * sk_h + kw * sk_w)[None, :]
        keep = tl.load(keep_ptr + k_offs, mask=out_ok, other=0)
        acc = tl.where(keep != 0, acc, tl.zeros_like(acc))  # dW exactly 0 at pruned weights
    c_offs = pid_s.to(tl.int64) * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------------
# Tile flags of the [C_out, C_in*kH*kW] mask view, cached per mask tensor object.
# ---------------------------------------------------------------------------------------------
def conv_tile_flags(mask: torch.Tensor) -> torch.Tensor:
    """``flags [ceil(C_out/16), ceil(C_in*kH*kW/16)]`` uint8: 1 where the 16x16 block of the GEMM
    view ``mask.reshape(C_out, -1)`` keeps anything. Cached on the (4-D) mask object itself, so a
    fresh reshape per call does not defeat the cache; recomputed when the mask changes in place."""
    return cached_on_mask(
        mask, "conv_tile_flags", lambda m: _compute_tile_flags(m.reshape(m.shape[0], -1))
    )


# ---------------------------------------------------------------------------------------------
# Launchers: check, allocate, launch. 4-D NCHW operands of any strides; ``out`` lets tests poison
# the output. stride / padding / dilation are pairs of ints (padding symmetric, >= 0).
# ---------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    # fp32 operands use TF32 exactly when F.conv2d would: cuDNN follows
    # torch.backends.cudnn.allow_tf32 (True by default, unlike cuBLAS's matmul flag), so "fp32"
    # means the precision of the dense conv this op replaces. 16-bit operands ignore it.
    tf32_ok = torch.backends.cudnn.allow_tf32 and not interpreter_enabled()
    return "ieee" if dtype == torch.float32 and not tf32_ok else "tf32"


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_launch(name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: kernels take float16, bfloat16 or float32, got {dtype}")
    devices = {k: t.device for k, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {devices}")
    for k, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"{name}: {k} must be 4-D, got shape {tuple(t.shape)}")
        if k != "mask" and t.dtype != dtype:
            raise TypeError(f"{name}: {k} must be {dtype}, got {t.dtype}")
    if tensors["mask"].dtype != torch.bool:
        raise TypeError(f"{name}: mask must be torch.bool, got {tensors['mask'].dtype}")


def _out(out: torch.Tensor | None, shape: tuple, like: torch.Tensor, dtype) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=like.device, dtype=dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != like.device:
        raise ValueError(
            f"out: expected shape {tuple(shape)}, dtype {dtype}, device {like.device}; got "
            f"{tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    return out


def _grid(M: int, N: int, splits: int = 1):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)


def _geometry(stride, padding, dilation) -> tuple[int, ...]:
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(
            f"masked_conv2d launch: expected stride, dilation >= 1 and padding >= 0, got "
            f"stride={tuple(stride)}, padding={tuple(padding)}, dilation={tuple(dilation)}"
        )
    return sh, sw, ph, pw, dh, dw


def masked_conv2d_fwd_launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y [N, C_out, OH, OW] = conv2d(x [N, C_in, H, W], weight * mask) + bias [C_out]``
    (groups=1; ``weight`` and ``mask`` ``[C_out, C_in, kH, kW]``)."""
    _check_launch("masked_conv2d forward", {"x": x, "weight": weight, "mask": mask}, x.dtype)
    sh, sw, ph, pw, dh, dw = _geometry(stride, padding, dilation)
    B, C_in, H, W = x.shape
    C_out, C_w, KH, KW = weight.shape
    if C_w != C_in or mask.shape != weight.shape:
        raise ValueError(
            f"masked_conv2d forward: expected weight and mask [C_out, {C_in}, kH, kW], got weight "
            f"{tuple(weight.shape)}, mask {tuple(mask.shape)}"
        )
    if bias is not None and (tuple(bias.shape) != (C_out,) or bias.device != x.device):
        raise ValueError(
            f"masked_conv2d forward: expected bias [{C_out}] on {x.device}, got "
            f"{tuple(bias.shape)} on {bias.device}"
        )
    OH, OW = _out_size(H, KH, sh, ph, dh), _out_size(W, KW, sw, pw, dw)
    if OH < 1 or OW < 1:
        raise ValueError(
            f"masked_conv2d forward: output would be {OH}x{OW} (input {H}x{W}, kernel {KH}x{KW}, "
            f"stride ({sh}, {sw}), padding ({ph}, {pw}), dilation ({dh}, {dw})); expected >= 1x1"
        )
    y = _out(out, (B, C_out, OH, OW), x, x.dtype)
    M, N, K = B * OH * OW, C_out, C_in * KH * KW
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.copy_(bias.view(1, -1, 1, 1).expand_as(y)) if bias is not None else y.zero_()
    keep = mask.view(torch.uint8)
    _conv_fwd_kernel[_grid(M, N)](
        x, weight, keep, bias if bias is not None else x, y,
        M, N, K,
        H, W, OH, OW, KH, KW,
        sh, sw, ph, pw, dh, dw,
        *x.stride(), *weight.stride(), *keep.stride(), *y.stride(),
        HAS_BIAS=bias is not None, FLAT_W=weight.is_contiguous() and mask.is_contiguous(),
        UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
    )  # fmt: skip
    return y


def masked_conv2d_dx_launch(
    dy: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    input_hw: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dx [N, C_in, H, W]`` of ``conv2d(x, weight * mask)`` from ``dy [N, C_out, OH, OW]``;
    ``input_hw = (H, W)`` (several input sizes give one output size when the stride is > 1)."""
    _check_launch("masked_conv2d dx", {"dy": dy, "weight": weight, "mask": mask}, dy.dtype)
    sh, sw, ph, pw, dh, dw = _geometry(stride, padding, dilation)
    B, C_out, OH, OW = dy.shape
    C_w, C_in, KH, KW = weight.shape
    H, W = (int(v) for v in input_hw)
    expect = (_out_size(H, KH, sh, ph, dh), _out_size(W, KW, sw, pw, dw))
    if C_w != C_out or expect != (OH, OW) or mask.shape != weight.shape:
        raise ValueError(
            f"masked_conv2d dx: expected dy [N, {C_w}, {expect[0]}, {expect[1]}] and mask "
            f"{tuple(weight.shape)} for input {H}x{W}, got dy {tuple(dy.shape)}, mask "
            f"{tuple(mask.shape)}"
        )
    dx = _out(out, (B, C_in, H, W), dy, dy.dtype)
    M, N, K = B * H * W, C_in, C_out * KH * KW
    if M == 0 or N == 0:
        return dx
    if K == 0:
        return dx.zero_()
    keep = mask.view(torch.uint8)
    _conv_dx_kernel[_grid(M, N)](
        dy, weight, keep, dx,
        M, N, K,
        H, W, OH, OW, KH, KW,
        sh, sw, ph, pw, dh, dw,
        *dy.stride(), *weight.stride(), *keep.stride(), *dx.stride(),
        UPCAST=_upcast(dy.dtype), PRECISION=_precision(dy.dtype),
    )  # fmt: skip
    return dx


def _dw_splits(C_out: int, K: int, R: int) -> int:
    """How many parts to split dW's reduction into (see _DW_TARGET_PROGRAMS)."""
    tiles = triton.cdiv(C_out, _DW_NOMINAL_TILE) * triton.cdiv(K, _DW_NOMINAL_TILE)
    return max(1, min(triton.cdiv(_DW_TARGET_PROGRAMS, tiles), R // _DW_MIN_CHUNK))


def masked_conv2d_dw_launch(
    dy: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    out: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """``dweight [C_out, C_in, kH, kW] = conv2d_weight(x [N, C_in, H, W], dy [N, C_out, OH, OW])
    * mask``, exactly 0 where ``mask`` is False, 16x16 blocks of the ``[C_out, C_in*kH*kW]`` view
    that are all False skipped. ``splits``: parts of the ``N*OH*OW`` reduction run in parallel
    (fp32 partials, then summed); None picks it from the shape (1 for small problems)."""
    _check_launch("masked_conv2d dweight", {"dy": dy, "x": x, "mask": mask}, x.dtype)
    sh, sw, ph, pw, dh, dw = _geometry(stride, padding, dilation)
    B, C_in, H, W = x.shape
    C_out, C_m, KH, KW = mask.shape
    expect = (B, C_out, _out_size(H, KH, sh, ph, dh), _out_size(W, KW, sw, pw, dw))
    if C_m != C_in or tuple(dy.shape) != expect:
        raise ValueError(
            f"masked_conv2d dweight: expected mask [C_out, {C_in}, kH, kW] and dy {expect}, got "
            f"mask {tuple(mask.shape)}, dy {tuple(dy.shape)}"
        )
    OH, OW = expect[2:]
    dweight = _out(out, tuple(mask.shape), x, x.dtype)
    M, N, R = C_out, C_in * KH * KW, B * OH * OW
    if M == 0 or N == 0:
        return dweight
    if R == 0:
        return dweight.zero_()
    if splits is None:
        splits = _dw_splits(M, N, R)
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"masked_conv2d dweight: expected splits >= 1, got {splits!r}")
    chunk = triton.cdiv(triton.cdiv(R, splits), 64) * 64  # a multiple of every BLOCK_K
    splits = triton.cdiv(R, chunk)
    # Split partials go to an fp32 workspace (summed below); one split writes dW directly.
    target = (
        torch.empty((splits, M, N), device=x.device, dtype=torch.float32)
        if splits > 1
        else (
            dweight
            if dweight.is_contiguous()
            else torch.empty_like(dweight, memory_format=torch.contiguous_format)
        )
    )
    keep = mask.view(torch.uint8)
    flags = conv_tile_flags(mask)
    _conv_dw_kernel[_grid(M, N, splits)](
        dy, x, keep, flags, target,
        M, N, R, chunk,
        H, W, OH, OW, KH, KW,
        sh, sw, ph, pw, dh, dw,
        *dy.stride(), *x.stride(), *keep.stride(),
        M * N, N,
        flags.shape[0], flags.shape[1],
        FLAG=FLAG_BLOCK, UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
    )  # fmt: skip
    if splits > 1:
        dweight.copy_(target.sum(0).view(dweight.shape))
    elif target is not dweight:
        dweight.copy_(target)
    return dweight


# ---------------------------------------------------------------------------------------------
# Reference twin (the CPU path, float64, groups > 1) and dispatch.
# ---------------------------------------------------------------------------------------------
def masked_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: _IntOrPair = 1,
    padding: _IntOrPair | str = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """The definition, in one line of PyTorch: ``F.conv2d(x, weight * mask, bias, ...)``.

    No validation and plain autograd (so its weight gradient is ``grad * mask``, which is zero at
    pruned entries only while the unmasked gradient is finite). Tests compare against it.
    """
    return F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)


def _kernels_for(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, groups: int) -> bool:
    # groups > 1 (grouped / depthwise) takes the reference: the kernels have no group axis.
    return groups == 1 and use_kernels(x, weight, mask) and x.dtype in KERNEL_DTYPES


# Implementations shared by eager mode and the custom ops: kernels or reference, per call.
def _ref_dweight(dy, x, mask, stride, padding, dilation, groups):
    raw = torch.nn.grad.conv2d_weight(x, mask.shape, dy, stride, padding, dilation, groups)
    # where, not `* mask`: a NaN/inf in the raw gradient cannot leak into a pruned entry
    return torch.where(mask, raw, torch.zeros((), dtype=raw.dtype, device=raw.device))


def _fwd_impl(x, weight, mask, bias, stride, padding, dilation, groups):
    if _kernels_for(x, weight, mask, groups):
        return masked_conv2d_fwd_launch(x, weight, mask, bias, stride, padding, dilation)
    return F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)


def _dx_impl(dy, weight, mask, x_shape, stride, padding, dilation, groups):
    if _kernels_for(dy, weight, mask, groups):
        return masked_conv2d_dx_launch(dy, weight, mask, x_shape[-2:], stride, padding, dilation)
    w = weight * mask
    return torch.nn.grad.conv2d_input(list(x_shape), w, dy, stride, padding, dilation, groups)


def _dw_impl(dy, x, mask, stride, padding, dilation, groups):
    if _kernels_for(x, dy, mask, groups):
        return masked_conv2d_dw_launch(dy, x, mask, stride, padding, dilation)
    return _ref_dweight(dy, x, mask, stride, padding, dilation, groups)


# torch.library custom ops: opaque to torch.compile, so fullgraph=True traces a model of
# SparseConv2d layers without stepping into the launchers (mask cache, autotuner, Triton).
@torch.library.custom_op("sparsekern::masked_conv2d_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    return _fwd_impl(x, weight, mask, bias, tuple(stride), tuple(padding), tuple(dilation), groups)


@_fwd_op.register_fake
def _(x, weight, mask, bias, stride, padding, dilation, groups):
    kh, kw = weight.shape[-2:]
    oh = _out_size(x.shape[-2], kh, stride[0], padding[0], dilation[0])
    ow = _out_size(x.shape[-1], kw, stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], weight.shape[0], oh, ow))


@torch.library.custom_op("sparsekern::masked_conv2d_dx", mutates_args=())
def _dx_op(
    dy: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    x_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    conv = (tuple(stride), tuple(padding), tuple(dilation), groups)
    return _dx_impl(dy, weight, mask, tuple(x_shape), *conv)


@_dx_op.register_fake
def _(dy, weight, mask, x_shape, stride, padding, dilation, groups):
    return dy.new_empty(tuple(x_shape))


@torch.library.custom_op("sparsekern::masked_conv2d_dw", mutates_args=())
def _dw_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    return _dw_impl(dy, x, mask, tuple(stride), tuple(padding), tuple(dilation), groups)


@_dw_op.register_fake
def _(dy, x, mask, stride, padding, dilation, groups):
    return x.new_empty(tuple(mask.shape))


class _MaskedConv2dFn(torch.autograd.Function):
    """Autograd for ``conv2d(x, weight * mask, bias)`` with explicit symmetric padding.

    Kernel path (CUDA, or CPU under the interpreter; groups=1, fp32/fp16/bf16): the three fused
    kernels above, saving ``x``, ``weight`` and ``mask`` (no ``W*M`` tensor is made).
    Reference path: ``dx = conv2d_input(dy, weight * mask)`` (``W*M`` saved from the forward);
    ``dweight = conv2d_weight(x, dy)`` with pruned entries set to zero. Both:
    ``dbias = dy.sum((0, 2, 3))``. Under torch.compile the custom ops are used (each picks kernels
    or reference itself); in eager mode the implementations are called directly.
    """

    @staticmethod
    def forward(ctx, x, weight, mask, bias, stride, padding, dilation, groups):
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.masked_weight = False
        if torch.compiler.is_compiling():
            lists = (list(stride), list(padding), list(dilation))
            y = torch.ops.sparsekern.masked_conv2d_fwd(x, weight, mask, bias, *lists, groups)
        elif _kernels_for(x, weight, mask, groups):
            y = masked_conv2d_fwd_launch(x, weight, mask, bias, stride, padding, dilation)
        else:
            # Keep W*M for dx, as torch's autograd of F.conv2d(x, W*M) would.
            w = weight * mask  # [C_out, C_in/groups, kH, kW]; `* mask` keeps F.conv2d's semantics
            y = F.conv2d(x, w, bias, stride, padding, dilation, groups)
            ctx.save_for_backward(x, w, mask)
            ctx.masked_weight = True
            return y
        ctx.save_for_backward(x, weight, mask)
        return y

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable: fail loudly on double grad
    def backward(ctx, dy):
        x, w, mask = ctx.saved_tensors  # w: weight, or weight * mask when ctx.masked_weight
        conv = ctx.conv_args
        dx = dweight = dbias = None
        if torch.compiler.is_compiling():
            lists = [list(a) for a in conv[:3]]
            if ctx.needs_input_grad[0]:
                dx = torch.ops.sparsekern.masked_conv2d_dx(
                    dy, w, mask, list(x.shape), *lists, conv[3]
                )
            if ctx.needs_input_grad[1]:
                dweight = torch.ops.sparsekern.masked_conv2d_dw(dy, x, mask, *lists, conv[3])
        else:
            if ctx.needs_input_grad[0]:
                if ctx.masked_weight:
                    dx = torch.nn.grad.conv2d_input(x.shape, w, dy, *conv)
                else:
                    dx = _dx_impl(dy, w, mask, x.shape, *conv)
            if ctx.needs_input_grad[1]:
                dweight = _dw_impl(dy, x, mask, *conv)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            dbias = dy.sum(dim=(0, 2, 3))
        return dx, dweight, None, dbias, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public op: validation, padding forms, unbatched input, autocast.
# ---------------------------------------------------------------------------------------------
def _fmt_shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    """``value`` as a pair of ints >= ``minimum``; raises naming expected vs got."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(
            f"masked_conv2d: expected {name} as an int or a pair of ints, got {value!r}"
        )
    if min(pair) < minimum:
        raise ValueError(f"masked_conv2d: expected {name} >= {minimum}, got {value!r}")
    return pair


def _check_inputs(x, weight, mask, bias, groups) -> None:
    """Raise a clear error (expected vs got) for anything F.conv2d would reject obscurely."""
    for name, t in (("x", x), ("weight", weight), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"masked_conv2d: expected {name} to be a Tensor, got {type(t).__name__}"
            )
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(
            f"masked_conv2d: expected bias to be a Tensor or None, got {type(bias).__name__}"
        )
    if not x.is_floating_point():
        raise TypeError(f"masked_conv2d: expected a floating-point x, got dtype {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(
            f"masked_conv2d: expected a floating-point weight, got dtype {weight.dtype}"
        )
    if x.dim() not in (3, 4):
        raise ValueError(
            "masked_conv2d: expected x of rank 4 [N, C_in, H, W] or 3 [C_in, H, W], "
            f"got rank {x.dim()} with shape {_fmt_shape(x)}"
        )
    if weight.dim() != 4:
        raise ValueError(
            "masked_conv2d: expected weight of rank 4 [C_out, C_in/groups, kH, kW], "
            f"got rank {weight.dim()} with shape {_fmt_shape(weight)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"masked_conv2d: expected mask of dtype torch.bool, got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(
            f"masked_conv2d: expected mask of weight's shape {_fmt_shape(weight)}, "
            f"got {_fmt_shape(mask)}"
        )
    tensors = [("x", x), ("mask", mask)] + ([("bias", bias)] if bias is not None else [])
    for name, t in tensors:
        if t.device != weight.device:
            raise ValueError(
                f"masked_conv2d: expected {name} on weight's device {weight.device}, got {t.device}"
            )
    if x.dtype != weight.dtype:
        raise TypeError(
            f"masked_conv2d: expected x of weight's dtype {weight.dtype}, got {x.dtype}"
        )
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"masked_conv2d: expected groups as an int >= 1, got {groups!r}")
    c_out, c_in_per_group = weight.shape[0], weight.shape[1]
    if c_out % groups != 0:
        raise ValueError(
            f"masked_conv2d: expected weight.shape[0] (C_out) divisible by groups={groups}, "
            f"got {c_out}"
        )
    c_in = x.shape[-3]
    if c_in != c_in_per_group * groups:
        raise ValueError(
            f"masked_conv2d: expected x with C_in = weight.shape[1] * groups = "
            f"{c_in_per_group} * {groups} = {c_in_per_group * groups} channels, got {c_in} "
            f"(x shape {_fmt_shape(x)})"
        )
    if bias is not None:
        if bias.shape != (c_out,):
            raise ValueError(
                f"masked_conv2d: expected bias of shape [{c_out}] (C_out), got {_fmt_shape(bias)}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(
                f"masked_conv2d: expected bias of weight's dtype {weight.dtype}, got {bias.dtype}"
            )


def _check_output_size(x, weight, stride, padding, dilation) -> None:
    H, W = x.shape[-2:]
    KH, KW = weight.shape[-2:]
    out = [_out_size(*a) for a in zip((H, W), (KH, KW), stride, padding, dilation)]
    if min(out) < 1:
        span = [d * (k - 1) + 1 for d, k in zip(dilation, (KH, KW))]
        raise ValueError(
            f"masked_conv2d: expected a padded input of at least the dilated kernel's size "
            f"{span[0]}x{span[1]}, got {H + 2 * padding[0]}x{W + 2 * padding[1]} (input {H}x{W}, "
            f"padding {padding}): the output would be {out[0]}x{out[1]}"
        )


def _resolve_padding(
    padding, weight: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """Turn ``padding`` (int, pair, 'valid' or 'same') into symmetric ``(pH, pW)`` plus, for an
    asymmetric 'same', the extra ``F.pad`` amounts ``(left, right, top, bottom)`` to apply first.

    'same' pads ``dilation * (k - 1)`` in total per dimension, the smaller half before and the
    larger after, exactly as ``F.conv2d`` does; the autograd Function then only needs symmetric
    padding (what ``conv2d_input`` / ``conv2d_weight`` take).
    """
    if not isinstance(padding, str):
        return _pair(padding, "padding", 0), None
    if padding == "valid":
        return (0, 0), None
    if padding != "same":
        raise ValueError(
            f"masked_conv2d: expected padding as an int, a pair of ints, 'valid' or 'same', "
            f"got {padding!r}"
        )
    if stride != (1, 1):
        raise ValueError(
            f"masked_conv2d: padding='same' needs stride 1 (as in F.conv2d), got stride={stride}"
        )
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    before = [t // 2 for t in totals]
    after = [t - b for t, b in zip(totals, before)]
    if before == after:
        return (before[0], before[1]), None
    # Symmetric part inside the conv, the odd extra row/column padded explicitly after.
    extra_h, extra_w = after[0] - before[0], after[1] - before[1]
    return (before[0], before[1]), (0, extra_w, 0, extra_h)


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: _IntOrPair = 1,
    padding: _IntOrPair | str = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)``, autograd-aware,
    with ``dweight`` exactly zero where ``mask`` is False.

    Args:
        x: ``[N, C_in, H, W]`` or unbatched ``[C_in, H, W]``, floating point.
        weight: ``[C_out, C_in / groups, kH, kW]``, same dtype and device as ``x``.
        mask: ``torch.bool``, ``weight``'s shape and device; True keeps a weight.
        bias: ``[C_out]`` or None.
        stride, dilation: int or pair, >= 1.
        padding: int or pair (>= 0), or ``'valid'`` / ``'same'`` (``'same'`` needs stride 1).
        groups: int >= 1 dividing ``C_in`` and ``C_out``.

    Returns:
        ``[N, C_out, H_out, W_out]`` (``[C_out, H_out, W_out]`` for unbatched ``x``).

    Raises:
        TypeError / ValueError naming the expected and the received value for a wrong rank, shape,
        dtype, device or conv argument.
    """
    # Under autocast F.conv2d would run in the autocast dtype; cast explicitly here (recorded by
    # autograd, so gradients return to the original dtypes) and run the Function with autocast
    # off so that forward and backward see consistent dtypes.
    autocast_on = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    if autocast_on:
        dtype = torch.get_autocast_dtype(x.device.type)
        if x.is_floating_point():
            x = x.to(dtype)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            weight = weight.to(dtype)
        if isinstance(bias, torch.Tensor) and bias.is_floating_point():
            bias = bias.to(dtype)
    _check_inputs(x, weight, mask, bias, groups)
    stride2 = _pair(stride, "stride", 1)
    dilation2 = _pair(dilation, "dilation", 1)
    padding2, extra = _resolve_padding(padding, weight, stride2, dilation2)

    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if extra is not None:
        x = F.pad(x, extra)
    _check_output_size(x, weight, stride2, padding2, dilation2)
    args = (x, weight, mask, bias, stride2, padding2, dilation2, groups)
    if autocast_on:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = _MaskedConv2dFn.apply(*args)
    else:
        y = _MaskedConv2dFn.apply(*args)
    return y.squeeze(0) if unbatched else y


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (``python -m sparsekern.ops._compile_check``): every GPU config x
# dtype of the three kernels, compiled for real GPU targets on a machine without one.
# ---------------------------------------------------------------------------------------------
def compile_specs():
    """Yield ``(name, jit_fn, signature, constexprs, num_warps, num_stages)`` for each kernel
    config and dtype; signatures list the kernels' arguments in order."""
    geom = ("H", "W", "OH", "OW", "KH", "KW")
    geom += ("stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")

    def ints(*names):
        return {n: "i32" for n in names}

    def strides(prefix):
        return ints(*(f"{prefix}_{d}" for d in ("n", "c", "h", "w")))

    w_strides = ints("sw_o", "sw_c", "sw_h", "sw_w")
    k_strides = ints("sk_o", "sk_c", "sk_h", "sk_w")
    # fp32 twice: "ieee" (cudnn.allow_tf32 off) and TF32 (torch's default for convolutions).
    for label, dt, prec in (
        ("bf16", "bf16", "tf32"),
        ("fp16", "fp16", "tf32"),
        ("fp32", "fp32", "ieee"),
        ("fp32tf32", "fp32", "tf32"),
    ):
        p = f"*{dt}"
        specs = {
            "fwd": (
                _conv_fwd_kernel,
                {"x_ptr": p, "w_ptr": p, "keep_ptr": "*u8", "bias_ptr": p, "y_ptr": p}
                | ints("M", "N", "K", *geom)
                | strides("sx")
                | w_strides
                | k_strides
                | strides("sy"),
                {"HAS_BIAS": True, "FLAT_W": True},
            ),
            "dx": (
                _conv_dx_kernel,
                {"dy_ptr": p, "w_ptr": p, "keep_ptr": "*u8", "dx_ptr": p}
                | ints("M", "N", "K", *geom)
                | strides("sdy")
                | w_strides
                | k_strides
                | strides("sdx"),
                {},
            ),
            "dw": (
                _conv_dw_kernel,
                {"dy_ptr": p, "x_ptr": p, "keep_ptr": "*u8", "flags_ptr": "*u8", "c_ptr": p}
                | ints("M", "N", "R", "CHUNK", *geom)
                | strides("sdy")
                | strides("sx")
                | k_strides
                | ints("stride_cs", "stride_cm", "FLAG_M", "FLAG_N"),
                {"FLAG": FLAG_BLOCK},
            ),
        }
        if dt != "fp32":  # split-K partials go to an fp32 workspace: another specialisation
            kernel, sig, extra = specs["dw"]
            specs["dw_split"] = (kernel, sig | {"c_ptr": "*fp32"}, extra)
        if dt == "bf16":  # the strided-weight forward (FLAT_W=False) once, in one dtype
            kernel, sig, extra = specs["fwd"]
            specs["fwd_strided"] = (kernel, sig, extra | {"FLAT_W": False})
        for kind, (kernel, sig, extra) in specs.items():
            for bm, bn, bk, g, w, s in _GPU_CONFIGS[kind.split("_")[0]]:
                consts = {**extra, "UPCAST": False, "PRECISION": prec}
                consts |= {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}
                name = f"masked_conv2d.{kind}[{label},{bm}x{bn}x{bk},w{w},s{s}]"
                yield name, kernel.fn, sig, consts, w, s
