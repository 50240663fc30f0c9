"""Where an op runs: CUDA tensors -> Triton kernels; CPU tensors -> the plain-PyTorch reference,
unless ``TRITON_INTERPRET=1`` is set, in which case CPU tensors run the same Triton kernels through
Triton's interpreter (how the kernels are tested without a GPU)."""

from __future__ import annotations

import functools
import os

import torch


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency, but keep the CPU path alive
        return False
    return True


def use_kernels(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton kernels should run for these tensors (all on one device). Called
    three times per layer per training step, so it stays cheap (about a microsecond)."""
    first = tensors[0]
    if first.is_cuda:
        return True
    return first.device.type == "cpu" and interpreter_enabled() and triton_available()
