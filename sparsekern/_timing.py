"""One interleaved timer: callables timed against each other in one process, repeats rotated,
medians of per-repeat ratios (what the format chooser and the benchmarks use; a timing on a loaded
machine is noise, so callers check :func:`machine_busy` first)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["interleaved_times"]


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int = 15,
    budget_s: float = 2.0,
    device: torch.device | None = None,
    min_repeats: int = 5,
) -> dict[str, tuple[float, float]]:
    """Time the callables against each other: every repeat runs each of them (order rotated)
    once untimed, then ``inner`` calls timed (about a millisecond or more, set per callable):
    steady-state calls, not the cold one that follows another callable's sweep through memory
    (a 4096 x 4096 CSR layer at 4% kept fits the cache, a dense one does not). A ratio is taken
    per repeat against the first callable's time of that repeat, and the medians are returned:
    ``{name: (median seconds per call, median of first / name)}``. Stops after ``repeats``
    repeats or ``budget_s`` seconds (at least ``min_repeats``). CUDA is synchronised around each
    timed run."""
    names = list(fns)
    sync = (
        torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    )
    inner = {}
    for n, f in fns.items():  # warm-up (caches, autotuning, lazy builds), then one timed call
        f()
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        once = max(time.perf_counter() - t0, 1e-6)
        inner[n] = max(1, min(200, math.ceil(1e-3 / once)))
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(max(repeats, min_repeats)):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            f, k = fns[n], inner[n]
            f()
            sync()
            t = time.perf_counter()
            for _ in range(k):
                f()
            sync()
            times[n].append((time.perf_counter() - t) / k)
        if r + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    base = times[names[0]]
    return {
        n: (statistics.median(ts), statistics.median(b / t for b, t in zip(base, ts)))
        for n, ts in times.items()
    }
