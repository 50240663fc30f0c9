"""Large CPU weight gradients on fresh zero pages (the C++ extension's ``fresh_zeros``).

A weight gradient is a fresh tensor every step (``zero_grad(set_to_none=True)`` frees the last
one), and torch's CPU allocator hands a tensor this large (16 MiB and up) straight from ``mmap``:
the first write of each 4 KiB page faults into the kernel, which zeroes it. The extension maps
the pages itself with ``MADV_HUGEPAGE``, so a first touch maps 2 MiB (a 9216 x 4096 fp32
gradient: 72 faults instead of 36,864). Measured on 2 threads (AVX-512 Xeon, quiet):

* ``torch.mm(dy.T, x)`` for 9216 x 4096 from 64 rows: 54.6 ms into torch's allocation, 33.1 ms
  into fresh pages (4096 x 4096 from 16 rows: 18.9 against 7.1 ms);
* below :data:`FRESH_MIN` (3072 x 768: 4.0 against 4.8 ms) the allocator's recycled memory wins.

Used where the package owns a large CPU weight gradient: the masked path's dW
(``masked_linear``: the vendor GEMM writes into fresh pages, then the mask pass) and the dense
storage sparse path's scatter (``sparse_train._kernels.scatter_dense``). Where transparent huge
pages are off the mapping still saves the fill; where the extension is unavailable nothing
changes (:func:`fresh_zeros` returns None).
"""

from __future__ import annotations

import pathlib

import torch

from sparsekern.ops._ext import load_extension

__all__ = ["FRESH_MIN", "fresh_zeros", "fresh_ok"]

#: From this many elements (16 MiB of fp32) a gradient goes on fresh pages.
FRESH_MIN = 1 << 22

_SOURCES = [pathlib.Path(__file__).resolve().parent / "csrc" / "sparse_linear.cpp"]


def ext():
    """The ``sparse_linear`` extension (shared with ``sparse_train._kernels``), or None."""
    return load_extension("sparse_linear", _SOURCES)  # a dict lookup once built


def fresh_ok(t: torch.Tensor, numel: int) -> bool:
    """True when a ``numel``-element gradient for ``t`` goes on fresh pages: CPU fp32, at least
    :data:`FRESH_MIN` elements, the extension available."""
    return (
        numel >= FRESH_MIN
        and t.device.type == "cpu"
        and t.dtype == torch.float32
        and ext() is not None
    )


def fresh_zeros(shape: tuple[int, ...]) -> torch.Tensor:
    """A zero fp32 CPU tensor of ``shape`` on fresh pages (callers check :func:`fresh_ok`)."""
    numel = 1
    for d in shape:
        numel *= d
    return ext().fresh_zeros(numel).view(shape)
