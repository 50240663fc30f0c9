"""sparse_conv2d: a conv2d training step (forward, dX, dW) that touches the kept weights only.

Shapes: ``x [N, C_in, H, W]``, ``weight [C_out, C_in, kH, kW]`` (groups=1), ``mask`` bool of the
weight's shape, ``bias [C_out]`` or None; ``y [N, C_out, H_out, W_out]``. Symmetric zero padding,
any stride and dilation.

How (CPU, the C++/OpenMP extension ``ops/csrc/sparse_conv2d.cpp``; SparseProp's idea, ICML 2023,
with register tiling): the weight is read as CSR over ``[C_out, C_in*kH*kW]``; activations are
re-laid out batch-last and zero-padded, ``[C, H+2p, W+2p, N rounded up to 16]``, so each kept
weight is one offset and every inner loop is a 16-float vector FMA over the batch:

* forward: per output channel and row, a register tile of output positions accumulates
  ``value * x[offset + position]`` over the channel's kept weights;
* dX (the transposed product) and dW (at the mask's nonzeros only, an SDDMM): one pass per input
  channel over the transposed index (CSC, bucketed by stride phase), parallel over input
  channels, so no two threads write the same dX row or the same dW entry (no atomics).

``weight.grad`` comes back dense (the layer's Parameter is dense) and exactly zero where the mask
is False: the kernel computes ``nnz`` values and they are scattered into zeros; the dense weight
gradient is never computed. fp16/bf16 inputs are computed in fp32 (the layout pass upcasts) and
the results cast back. Under ``create_graph`` (double backward) the backward runs the plain twin
(:func:`sparse_conv2d_reference`) so higher derivatives exist.

When the extension is unavailable (no compiler, ``SPARSEKERN_NO_EXT=1``), or the input is not on
the CPU, :func:`sparse_conv2d` runs the vendor path (``masked_conv2d``: the dense conv on the
weight, dW masked): same results, dense cost. :func:`extension_available` says which.

The index (CSR, CSC permutation, offsets) is cached on the mask tensor
(``sparsekern.ops._mask_cache``), keyed on its version counter and on the geometry (input size,
padded batch, conv arguments): a mask edited in place is re-indexed before any use.
Memory per kept weight: 8 (flat index) + 8 (forward offset) + 8 (CSC offset) + 8 (permutation)
+ 8 (CSC flat index) = 40 bytes, plus the activations' batch-last copies (input and dO, fp32,
batch padded to 16).
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import torch

from sparsekern.ops._checks import check_bias
from sparsekern.ops._conv import conv_out_size
from sparsekern.ops._ext import load_extension
from sparsekern.ops._mask_cache import cached_on_mask
from sparsekern.ops.sparse_train.conv2d_reference import sparse_conv2d_reference

__all__ = ["ConvGeometry", "conv_geometry", "extension_available", "sparse_conv2d"]

_SOURCE = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "sparse_conv2d.cpp"
_EXT_NAME = "sparse_conv2d"
# The kernels compute in fp32: half types are upcast; float64 keeps its precision (vendor path).
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ext():
    # torch 2.14's headers need C++20 (the loader's default is -std=c++17; the later flag wins).
    return load_extension(_EXT_NAME, [_SOURCE], extra_cflags=("-std=c++20",))


def extension_available() -> bool:
    """True when the C++ kernels are built and loaded (builds them on first call)."""
    return _ext() is not None


class ConvGeometry(NamedTuple):
    """Everything the kernels need for one (mask, input size, conv arguments): index tensors
    (int64) in CSR order (``flat`` into the weight, ``row_ptr [C_out+1]``, forward ``off``) and
    in CSC order (``perm`` of the CSR entries, ``col_ptr [C_in*sH*sW+1]``, backward ``doff``,
    ``flat_csc``), plus the sizes."""

    flat: torch.Tensor
    row_ptr: torch.Tensor
    off: torch.Tensor
    perm: torch.Tensor
    col_ptr: torch.Tensor
    doff: torch.Tensor
    flat_csc: torch.Tensor
    batch_pad: int  # Bp: batch rounded up to 16
    out_hw: tuple[int, int]
    dout_pad: tuple[int, int, int, int]  # dO zero rows/cols: top, bottom, left, right


def _round16(n: int) -> int:
    return max(16, -(-n // 16) * 16)


def _mask_coords(mask: torch.Tensor):
    """Kept entries of ``mask [C_out, C_in, kH, kW]`` in CSR (row-major) order."""
    c_out, c_in, kh, kw = mask.shape
    flat = mask.reshape(-1).nonzero().squeeze(1)
    k = flat % (c_in * kh * kw)
    oc = flat // (c_in * kh * kw)
    ic, i, j = k // (kh * kw), (k // kw) % kh, k % kw
    row_ptr = torch.zeros(c_out + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(oc, minlength=c_out).cumsum(0)
    return flat, row_ptr, oc, ic, i, j


def conv_geometry(
    mask: torch.Tensor,
    in_hw: tuple[int, int],
    batch: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> ConvGeometry:
    """The kernels' index for ``mask`` at this input size and batch (cached on the mask)."""
    key = (tuple(in_hw), _round16(batch), tuple(stride), tuple(padding), tuple(dilation))
    return cached_on_mask(mask, "sparse_train.conv2d", lambda m: _build_geometry(m, *key), key=key)


def _build_geometry(mask, in_hw, bp, stride, padding, dilation) -> ConvGeometry:
    c_out, c_in, kh, kw = mask.shape
    (h, w), (sh, sw), (ph, pw), (dh, dw) = in_hw, stride, padding, dilation
    hp, wp = h + 2 * ph, w + 2 * pw
    oh, ow = conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)
    flat, row_ptr, oc, ic, i, j = _mask_coords(mask.cpu())
    off = ((ic * hp + i * dh) * wp + j * dw) * bp
    # Backward: input position hp = a + sH*m takes taps with (i*dH) % sH == a, from output row
    # m - (i*dH)//sH; dO gets ah zero rows before it so that row index is never negative, and
    # enough after it for the last input row's m.
    ah, aw = ((kh - 1) * dh) // sh, ((kw - 1) * dw) // sw
    ohp = ah + max(oh, (ph + h - 1) // sh + 1)
    owp = aw + max(ow, (pw + w - 1) // sw + 1)
    phase = (ic * sh + (i * dh) % sh) * sw + (j * dw) % sw
    perm = torch.sort(phase, stable=True).indices
    col_ptr = torch.zeros(c_in * sh * sw + 1, dtype=torch.int64)
    col_ptr[1:] = torch.bincount(phase, minlength=c_in * sh * sw).cumsum(0)
    doff = ((oc * ohp + ah - (i * dh) // sh) * owp + aw - (j * dw) // sw) * bp
    return ConvGeometry(
        flat=flat,
        row_ptr=row_ptr,
        off=off.contiguous(),
        perm=perm,
        col_ptr=col_ptr,
        doff=doff[perm].contiguous(),
        flat_csc=flat[perm].contiguous(),
        batch_pad=bp,
        out_hw=(oh, ow),
        dout_pad=(ah, ohp - ah - oh, aw, owp - aw - ow),
    )


class _SparseConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask, geom, stride, padding, dilation):
        ext = _ext()
        n = x.shape[0]
        ph, pw = padding
        bp = geom.batch_pad
        xp = ext.to_batch_last(x.detach().float().contiguous(), ph, ph, pw, pw, bp)
        vals = weight.detach().reshape(-1)[geom.flat].float().contiguous()
        b32 = None if bias is None else bias.detach().float().contiguous()
        oh, ow = geom.out_hw
        y = ext.forward(xp, geom.row_ptr, geom.off, vals, b32, n, oh, ow, stride[0], stride[1])
        ctx.save_for_backward(x, weight, bias, mask)
        ctx.xp, ctx.vals, ctx.geom = xp, vals, geom
        ctx.conv = (stride, padding, dilation)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, mask = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the plain twin so higher derivatives exist.
            with torch.enable_grad():
                inputs = [t for t, need in ((x, need_x), (weight, need_w), (bias, need_b)) if need]
                y = sparse_conv2d_reference(x, weight, mask, bias, stride, padding, dilation)
                grads = iter(torch.autograd.grad(y, inputs, gy, create_graph=True))
            out = [next(grads) if need else None for need in (need_x, need_w, need_b)]
            return (*out, None, None, None, None, None)
        ext, geom = _ext(), ctx.geom
        n, _, h, w = x.shape
        top, bottom, left, right = geom.dout_pad
        g32 = gy.float().contiguous()
        dgp = ext.to_batch_last(g32, top, bottom, left, right, geom.batch_pad)
        dx, dw = ext.backward(
            ctx.xp, dgp, geom.col_ptr, geom.doff, geom.perm, geom.flat_csc, ctx.vals,
            n, h, w, weight.numel(), padding[0], padding[1], stride[0], stride[1], need_x, need_w,
        )  # fmt: skip
        dx = dx.to(x.dtype) if need_x else None
        dweight = dw.view_as(weight).to(weight.dtype) if need_w else None
        dbias = g32.sum((0, 2, 3)).to(bias.dtype) if need_b else None
        return dx, dweight, dbias, None, None, None, None, None


def sparse_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """``F.conv2d(x, weight * mask, bias, stride, padding, dilation)`` on the kept weights only.

    Args:
        x: ``[N, C_in, H, W]`` float32/float16/bfloat16 on the CPU.
        weight: ``[C_out, C_in, kH, kW]``, ``x``'s dtype; its pruned entries are never read.
        mask: bool, ``weight``'s shape.
        bias: ``[C_out]`` or None.
        stride, padding, dilation: pairs of ints (padding symmetric, zeros).

    Returns ``[N, C_out, H_out, W_out]`` in ``x``'s dtype. ``dweight`` is dense and exactly zero
    where ``mask`` is False. Without the extension, off the CPU, or for float64 (the kernels
    accumulate in fp32) this is ``masked_conv2d``.

    Raises:
        ValueError / TypeError naming expected vs got for a wrong rank, shape, dtype or device.
    """
    _check(x, weight, mask, bias, stride, padding, dilation)
    if x.dtype not in _KERNEL_DTYPES or x.device.type != "cpu" or _ext() is None:
        from sparsekern.ops.masked_conv2d import masked_conv2d

        return masked_conv2d(x, weight, mask, bias, stride, padding, dilation)
    geom = conv_geometry(mask, tuple(x.shape[-2:]), x.shape[0], stride, padding, dilation)
    return _SparseConv2dFn.apply(x, weight, bias, mask, geom, stride, padding, dilation)


def _check(x, weight, mask, bias, stride, padding, dilation) -> None:
    who = "sparse_conv2d"
    if x.dim() != 4:
        raise ValueError(f"{who}: expected x of rank 4 [N, C_in, H, W], got shape {list(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(
            f"{who}: expected weight of rank 4 [C_out, C_in, kH, kW], got {list(weight.shape)}"
        )
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(
            f"{who}: expected a bool mask of shape {list(weight.shape)}, "
            f"got {mask.dtype} {list(mask.shape)}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{who}: expected x with C_in = {weight.shape[1]} channels (groups=1), got {x.shape[1]}"
        )
    if x.dtype != weight.dtype or not x.is_floating_point():
        raise TypeError(
            f"{who}: expected x of weight's floating dtype {weight.dtype}, got {x.dtype}"
        )
    for t, name in ((weight, "weight"), (mask, "mask"), (bias, "bias")):
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{who}: expected {name} on x's device {x.device}, got {t.device}")
    check_bias(who, bias, weight.shape[0], weight, dim="C_out")
    for name, pair, lo in (
        ("stride", stride, 1),
        ("padding", padding, 0),
        ("dilation", dilation, 1),
    ):
        if len(pair) != 2 or min(pair) < lo:
            raise ValueError(f"{who}: expected {name} as a pair of ints >= {lo}, got {pair!r}")
    kh, kw = weight.shape[2:]
    oh = conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    if min(oh, ow) < 1:
        raise ValueError(
            f"{who}: expected a padded input at least the dilated kernel's size, got an output "
            f"of {oh}x{ow}"
        )
