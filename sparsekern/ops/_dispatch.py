"""Where an op runs.

* Forward and dX of every unstructured op (``masked_linear``, ``masked_conv2d``) run the vendor
  library on every device (cuBLAS/cuDNN, MKL/oneDNN): with pruned weights exactly zero, a dense
  GEMM on the weight computes the masked product, and no custom kernel has been measured faster.
* Triton kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set (how
  the kernels are tested without a GPU): the block-sparse ops, and ``masked_linear``'s fused dW
  kernel where it skips enough all-pruned tiles to win (see ``masked_linear.dw_backend``).
* Elsewhere (CPU without the interpreter, float64, triton missing) the vendor or plain-PyTorch
  path runs.
"""

from __future__ import annotations

import os

import torch

from sparsekern.ops._triton import HAS_TRITON

__all__ = ["interpreter_enabled", "triton_available", "use_kernels"]


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set to something other than ``0``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when ``import triton`` works."""
    return HAS_TRITON


def use_kernels(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton kernels should run for these tensors (all on one device): CUDA, or the
    CPU under the interpreter. On CUDA without triton this is still True, so the launch raises
    ``TritonUnavailable`` rather than silently taking another path. About a microsecond."""
    first = tensors[0]
    if first.is_cuda:
        return True
    return first.device.type == "cpu" and HAS_TRITON and interpreter_enabled()
