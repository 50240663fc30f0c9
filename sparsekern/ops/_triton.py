"""Triton, optionally. ``pip install sparsekern`` and ``import sparsekern`` work without it (macOS,
Windows, CPU-only machines): every op has a vendor or plain-PyTorch path, and a clear error is
raised only where a Triton kernel would run (a CUDA tensor through a block-sparse op, or
``TRITON_INTERPRET=1``).

Kernel modules import ``triton`` and ``tl`` from here. Without triton they get small stand-ins:
``@triton.jit`` and ``@triton.autotune`` still decorate (so the kernel modules import), and calling
or launching a kernel raises :class:`TritonUnavailable`. Kernel bodies are never executed by the
stand-ins; annotations such as ``BLOCK: tl.constexpr`` stay strings (the kernel modules use
``from __future__ import annotations``).
"""

from __future__ import annotations

__all__ = ["HAS_TRITON", "TritonUnavailable", "require_triton", "tl", "triton"]


class TritonUnavailable(RuntimeError):
    """A Triton kernel was asked for but triton is not installed."""


def require_triton(what: str) -> None:
    """Raise :class:`TritonUnavailable` naming ``what`` unless triton can be imported."""
    if not HAS_TRITON:
        raise TritonUnavailable(
            f"{what} needs triton (expected `import triton` to work, got ImportError); install it "
            "with `pip install triton` on a machine with an NVIDIA GPU, or run on CPU tensors, "
            "which take the vendor (MKL/oneDNN) path"
        )


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by tests/ops/test_triton_optional.py
    HAS_TRITON = False

    class _Kernel:
        """What ``@triton.jit`` returns without triton: importable, never launchable."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")
            self.__doc__ = getattr(fn, "__doc__", None)

        def __getitem__(self, grid):
            require_triton(f"the Triton kernel {self.__name__}")

        def __call__(self, *args, **kwargs):
            require_triton(f"the Triton kernel {self.__name__}")

    class _Config:
        def __init__(self, kwargs, num_warps=4, num_stages=3, **extra):
            self.kwargs = dict(kwargs)
            self.num_warps = num_warps
            self.num_stages = num_stages

    class _TritonStandIn:
        Config = _Config

        @staticmethod
        def jit(fn=None, **_):
            return _Kernel(fn) if fn is not None else _Kernel

        @staticmethod
        def autotune(*_, **__):
            return lambda kernel: kernel

        @staticmethod
        def heuristics(*_, **__):
            return lambda kernel: kernel

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    class _LanguageStandIn:
        constexpr = object()

    triton = _TritonStandIn()
    tl = _LanguageStandIn()
