"""What every launcher shares: the dtypes the kernels take, precision and interpreter flags,
output allocation (``out=`` lets tests poison outputs), 2-D views of activations, autocast."""

from __future__ import annotations

import torch

from sparsekern.ops._checks import check_bias
from sparsekern.ops._dispatch import interpreter_enabled

__all__ = [
    "KERNEL_DTYPES",
    "as_rows",
    "autocast_to",
    "check_2d",
    "check_linear_inputs",
    "dot_precision",
    "interpreter_upcast",
    "out_tensor",
    "twin_vjp",
]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# torch.is_autocast_enabled raises "unknown device type" for others (meta, for one).
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def dot_precision(dtype: torch.dtype, allow_tf32: bool | None = None) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``. fp32 uses TF32 only when torch
    allows it for the vendor op it replaces (``allow_tf32``; default: cuBLAS's flag,
    ``torch.backends.cuda.matmul.allow_tf32``, off by default), so "fp32" means the same
    precision in both. 16-bit operands ignore it."""
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    tf32_ok = allow_tf32 and not interpreter_enabled()
    return "ieee" if dtype == torch.float32 and not tf32_ok else "tf32"


def interpreter_upcast(dtype: torch.dtype) -> bool:
    """True under the interpreter for bf16: its ``tl.dot`` on bf16 operands is wrong (triton 3.6,
    3.8), so kernels upcast to fp32 there, which is exact for bf16 inputs."""
    return interpreter_enabled() and dtype == torch.bfloat16


def check_2d(name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Raise unless ``dtype`` is a kernel dtype and every tensor is 2-D on one device."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: kernels take float16, bfloat16 or float32, got {dtype}")
    devices = {k: t.device for k, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{name}: expected all tensors on one device, got {devices}")
    for k, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"{name}: expected {k} 2-D, got shape {list(t.shape)}")


def out_tensor(out: torch.Tensor | None, shape: tuple, like: torch.Tensor, dtype) -> torch.Tensor:
    """A fresh ``empty(shape)`` on ``like``'s device, or ``out`` once checked."""
    shape = tuple(shape)
    if out is None:
        return torch.empty(shape, device=like.device, dtype=dtype)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != like.device:
        raise ValueError(
            f"out: expected shape {list(shape)}, dtype {dtype}, device {like.device}; got "
            f"{list(out.shape)}, {out.dtype}, {out.device}"
        )
    return out


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., C] -> [rows, C]``, contiguous (a no-op for the usual 2-D contiguous input)."""
    if t.dim() != 2:
        t = t.reshape(-1, t.shape[-1])
    return t if t.is_contiguous() else t.contiguous()


def autocast_to(x, *others):
    """Under ``torch.autocast`` on ``x``'s device: ``x`` and ``others`` (tensors or None) cast to
    the autocast dtype, as ``F.linear`` would do (the casts are recorded by autograd, so gradients
    return in the original dtypes); otherwise unchanged. Returns ``(x, *others)``."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        return (x, *others)
    dev = x.device.type
    if dev not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(dev):
        return (x, *others)
    dt = torch.get_autocast_dtype(dev)
    cast = [
        t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in others
    ]
    return (x.to(dt), *cast)


def check_linear_inputs(
    who: str, x, out_features: int, in_features: int, weight, bias, in_name: str = "in_features"
) -> None:
    """The checks every linear op makes of ``x [..., in_features]`` and ``bias [out_features]``
    against its weight (a tensor or a sparse matrix: anything with ``dtype`` and ``device``); each
    error names ``who``, what was expected and what came."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{who}: expected x as a floating-point tensor, got {got}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{who}: expected x of shape [..., {in_features}] (the weight's {in_name}), got "
            f"{list(x.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"{who}: expected x of the weight's dtype {weight.dtype}, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(
            f"{who}: expected x on the weight's device {weight.device}, got {x.device}"
        )
    check_bias(who, bias, out_features, x)


def twin_vjp(twin, inputs: tuple, needs: tuple, dy: torch.Tensor) -> list:
    """The backward of an op as a graph, for ``create_graph=True`` (gradient penalties,
    Hessian-vector products, meta-learning): the vector-Jacobian product of ``dy`` with the op's
    differentiable plain-torch twin ``twin(*inputs)``, built with ``create_graph=True``. The
    kernels' own backward is not differentiable; this costs a dense recompute, and only when a
    second derivative was asked for.

    Args:
        twin: differentiable function of ``inputs`` with the op's output.
        inputs: the tensors saved for backward (their autograd history is live here).
        needs: ``ctx.needs_input_grad`` for the same positions.
        dy: the incoming gradient, ``twin``'s output's shape.
    Returns:
        One gradient or None per input.
    """
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    with torch.enable_grad():
        y = twin(*inputs)
        grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    out = []
    for t, need in zip(inputs, needs):
        g = next(grads) if need and t is not None else None
        out.append(torch.zeros_like(t) if g is None and need and t is not None else g)
    return out
