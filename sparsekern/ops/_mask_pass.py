"""Zeroing the pruned entries of a weight-sized tensor (a weight gradient): the one pass over memory
that a sparse layer's backward adds to the vendor GEMM/conv.

Semantics are ``torch.where(mask, t, 0)``, exactly: a pruned entry becomes +0.0 whatever it held,
NaN and inf included (``t * mask`` would keep NaN * 0 = NaN).

CPU, on the gradient's *bits* (an integer view: ``bits & -1 = bits``, ``bits * 0 = +0.0``, so the
result is exact ``where`` semantics). fp32 where the C++ extension is built: its
``zero_pruned_f32_``, the bool mask read as stored (AVX-512 masked loads, OpenMP over 64 KiB
chunks): 7.5 ms for a 4096 x 9216 gradient on 2 threads of the AVX-512 Xeon, against 12.4 ms for
the numpy pass below there. Otherwise (other dtypes, no extension), one of two ways by size:

* up to :data:`CACHED_BITS_MAX` weights (4 M: LeNets, most conv layers): ``bitwise_and_`` with a
  cached integer copy of the mask (0 or all ones, the gradient's width: 4 bytes per fp32 weight,
  at most 16 MiB), torch's vectorised, multithreaded kernel: 16 us for 300x784 fp32 on this
  project's 2-core machine, against 43 us for the numpy pass below. Cached on the mask, recomputed
  when the mask changes;
* larger: the bool mask as stored (1 byte per weight, nothing cached). torch's CPU kernels for a
  bool operand are scalar loops (a 4096 x 9216 fp32 gradient: 63 ms for ``mul_(bool_mask)``,
  28 ms for ``masked_fill_`` with a cached inverted mask, 9.4 ms for ``mul_`` by a cached float
  mask); numpy's ``multiply`` casts the bool operand in cache-sized chunks inside a vectorised
  loop at ~17 GB/s per thread: 20 ms on one thread, 11 ms on two for that gradient (numpy
  releases the GIL, so large tensors are split across ``torch.get_num_threads()`` threads).

CUDA (and any other device): ``torch.where(mask, t, 0, out=t)``, one elementwise kernel: 5 bytes
per bf16 weight moved, ~24 us for a 4096 x 4096 gradient at 3.35 TB/s.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from sparsekern.ops import _fresh
from sparsekern.ops._mask_cache import cached_on_mask

__all__ = ["CACHED_BITS_MAX", "zero_pruned", "zero_pruned_"]

#: Largest weight (elements) whose mask gets a cached integer copy for the CPU pass.
CACHED_BITS_MAX = 1 << 22
# Below this many elements one thread is faster than handing work to a pool (~30 us per task).
_PARALLEL_MIN = 1 << 20
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}

_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def _reset_pool() -> None:  # a forked child (DataLoader worker) must not reuse the parent's threads
    global _pool, _pool_workers
    _pool, _pool_workers = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool)


def _get_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_workers
    with _pool_lock:
        if _pool is None or _pool_workers < workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sparsekern-mask")
            _pool_workers = workers
        return _pool


_BITS_TAG = {dtype: f"bits:{dtype}" for dtype in _INT_VIEW.values()}  # formatted once: ~1 us


def _bits_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` as integers of ``dtype``: 0 where pruned, all ones (-1) where kept."""
    return cached_on_mask(mask, _BITS_TAG[dtype], lambda m: m.to(dtype).neg_())


def _zero_pruned_cpu_(t: torch.Tensor, mask: torch.Tensor) -> None:
    if t.dtype == torch.float32 and (ext := _fresh.ext()) is not None:
        ext.zero_pruned_f32_(t, mask)  # the bool mask read as stored, AVX-512 where built
        return
    itype = _INT_VIEW[t.element_size()]
    if t.numel() <= CACHED_BITS_MAX:
        t.view(itype).bitwise_and_(_bits_mask(mask, itype))
        return
    bits = t.view(itype).view(-1).numpy()
    keep = mask.reshape(-1).numpy()
    n = bits.size
    threads = min(torch.get_num_threads(), max(1, n // _PARALLEL_MIN))
    if threads <= 1:
        np.multiply(bits, keep, out=bits)
        return
    step = -(-n // threads)
    pool = _get_pool(threads - 1)
    futures = [
        pool.submit(np.multiply, bits[s : s + step], keep[s : s + step], out=bits[s : s + step])
        for s in range(step, n, step)
    ]
    np.multiply(bits[:step], keep[:step], out=bits[:step])
    for f in futures:
        f.result()


def zero_pruned_(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t`` with every entry where ``mask`` is False set to +0.0, in place; returns ``t``.

    Args:
        t: any floating tensor (a weight gradient), ``mask``'s shape and device.
        mask: ``torch.bool``, True keeps an entry.
    """
    if t.is_cpu and t.is_contiguous() and not t.requires_grad:
        m = mask if mask.is_contiguous() else mask.contiguous()
        _zero_pruned_cpu_(t, m)
    elif t.is_contiguous():
        torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device), out=t)
    else:
        t.copy_(zero_pruned(t, mask))
    return t


def zero_pruned(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, t, 0)``, out of place and differentiable (double backward)."""
    return torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))
