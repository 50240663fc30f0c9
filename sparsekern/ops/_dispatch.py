"""Where an op runs: CUDA tensors -> Triton kernels; CPU tensors -> the plain-PyTorch reference,
unless ``TRITON_INTERPRET=1`` is set, in which case CPU tensors run the same Triton kernels through
Triton's interpreter (how the kernels are tested without a GPU)."""

from __future__ import annotations

import os

import torch


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency, but keep the CPU path alive
        return False
    return True


def use_kernels(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton kernels should run for these tensors."""
    devs = {t.device.type for t in tensors if t is not None}
    if devs == {"cuda"}:
        return True
    if devs == {"cpu"}:
        return interpreter_enabled() and triton_available()
    return False
