"""Large CPU weight gradients on pooled huge-page mappings (the C++ extension's ``fresh_zeros`` /
``fresh_empty``).

A weight gradient is a fresh tensor every step (``zero_grad(set_to_none=True)`` frees the last
one), and torch's CPU allocator hands a tensor this large (16 MiB and up) straight from ``mmap``:
the first write of each 4 KiB page faults into the kernel, which zeroes it, and on a virtual
machine the hypervisor may have to back the page again too. The extension keeps such gradients in
2 MiB-aligned mappings advised ``MADV_HUGEPAGE`` and, when a gradient is freed, keeps its mapping
for the next gradient of that size (at most 2 GiB kept; :func:`release` unmaps them): a step's
gradient then costs its writes, not its page faults. Measured on 2 threads (AVX-512 Xeon VM):

* ``torch.mm(dy.T, x)`` for 9216 x 4096 from 64 rows: 54.6 ms into torch's allocation, 33.1 ms
  into a new huge-page mapping (4096 x 4096 from 16 rows: 18.9 against 7.1 ms);
* a new mapping's faults on that VM took 6 to 90 ms for a 67 MB gradient (the spread is the
  VM's: presumably the host backing again pages the guest freed; not verified on the host); a
  reused mapping takes none;
* below :data:`FRESH_MIN` (3072 x 768: 4.0 against 4.8 ms) the allocator's recycled memory wins.

Used where the package owns a large CPU weight gradient: the masked path's dW (``masked_linear``:
the vendor GEMM writes into the mapping, then the mask pass), the dense-storage sparse path's
scatter (``sparse_train._kernels.scatter_dense``) and block-mode training's dense gradient. Where
transparent huge pages are off the pooling still saves the faults; where the extension is
unavailable nothing changes (:func:`fresh_ok` is False).
"""

from __future__ import annotations

import math
import pathlib

import torch

from sparsekern.ops._ext import load_extension

__all__ = ["FRESH_MIN", "fresh_empty", "fresh_ok", "fresh_zeros", "pooled_bytes", "release"]

#: From this many elements (16 MiB of fp32) a gradient goes on a pooled mapping.
FRESH_MIN = 1 << 22

_SOURCES = [pathlib.Path(__file__).resolve().parent / "csrc" / "sparse_linear.cpp"]


def ext():
    """The ``sparse_linear`` extension (shared with ``sparse_train._kernels``), or None."""
    return load_extension("sparse_linear", _SOURCES)  # a dict lookup once built


def fresh_ok(t: torch.Tensor, numel: int) -> bool:
    """True when a ``numel``-element gradient for ``t`` goes on a pooled mapping: CPU fp32, at
    least :data:`FRESH_MIN` elements, the extension available."""
    return (
        numel >= FRESH_MIN
        and t.device.type == "cpu"
        and t.dtype == torch.float32
        and ext() is not None
    )


def fresh_zeros(shape: tuple[int, ...]) -> torch.Tensor:
    """A zero fp32 CPU tensor of ``shape`` (callers check :func:`fresh_ok`)."""
    return ext().fresh_zeros(math.prod(shape)).view(shape)


def fresh_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised fp32 CPU tensor of ``shape`` (an ``out=`` for a GEMM that writes it all)."""
    return ext().fresh_empty(math.prod(shape)).view(shape)


def pooled_bytes() -> int:
    """Bytes of freed gradient mappings kept for reuse (0 without the extension)."""
    e = ext()
    return 0 if e is None else int(e.pool_bytes())


def release() -> int:
    """Unmap the kept mappings (as ``torch.cuda.empty_cache`` does for CUDA); returns the bytes
    released."""
    e = ext()
    return 0 if e is None else int(e.release_pool())
