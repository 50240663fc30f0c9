"""One interleaved timer: callables timed against each other in one process, repeats rotated,
medians of per-repeat ratios (what the format chooser and the benchmarks use; a timing on a loaded
machine is noise, so callers check :func:`machine_busy` first)."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["interleaved_times", "other_load"]


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int = 15,
    budget_s: float = 2.0,
    device: torch.device | None = None,
    min_repeats: int = 5,
) -> dict[str, tuple[float, float]]:
    """Time the callables against each other: every repeat runs each of them (order rotated)
    once untimed (calls under 10 ms), then ``inner`` calls timed (about a millisecond or more,
    set per callable): steady-state calls, not the cold one that follows another callable's
    sweep through memory
    (a 4096 x 4096 CSR layer at 4% kept fits the cache, a dense one does not). A ratio is taken
    per repeat against the first callable's time of that repeat, and the medians are returned:
    ``{name: (median seconds per call, median of first / name)}``. Stops after ``repeats``
    repeats or ``budget_s`` seconds (at least ``min_repeats``). CUDA is synchronised around each
    timed run."""
    names = list(fns)
    sync = (
        torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    )
    inner, cold = {}, {}
    for n, f in fns.items():  # warm-up (caches, autotuning, lazy builds), then one timed call
        f()
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        once = max(time.perf_counter() - t0, 1e-6)
        inner[n] = max(1, min(200, math.ceil(1e-3 / once)))
        # the untimed call before each timed run matters for calls of the order of a cache
        # sweep; one of 10 ms or more is its own steady state (and doubles a slow layer's time)
        cold[n] = once < 1e-2
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(max(repeats, min_repeats)):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            f, k = fns[n], inner[n]
            if cold[n]:
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


def _proc_stat_busy() -> tuple[float, float] | None:
    """(busy jiffies of the whole machine, all jiffies) from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def other_load(window_s: float = 0.25) -> float | None:
    """Cores kept busy by *other* processes, measured over ``window_s`` while this process
    sleeps: the machine's busy time (``/proc/stat``) less this process's own CPU time
    (``os.times``), so a process that has just trained at full speed does not count itself (the
    1-minute load average would). None where ``/proc/stat`` is missing (then the caller may use
    ``os.getloadavg``)."""
    a = _proc_stat_busy()
    if a is None:
        return None
    t0, own0 = time.perf_counter(), sum(os.times()[:2])
    time.sleep(window_s)
    b = _proc_stat_busy()
    dt, own = time.perf_counter() - t0, sum(os.times()[:2]) - own0
    if b is None or b[1] <= a[1] or dt <= 0:
        return None
    cores = os.cpu_count() or 1
    busy_cores = (b[0] - a[0]) / (b[1] - a[1]) * cores
    return max(0.0, busy_cores - own / dt)
