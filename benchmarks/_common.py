"""What the benchmarks share: the environment record, the atomic JSON write, and the interleaved
timer of the CPU benchmarks.

Imported as ``from _common import ...``: the benchmarks run as scripts from this folder
(``python3 benchmarks/bench_x.py``), which puts it first on ``sys.path``."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time

import torch

try:
    import triton
except ImportError:  # the --smoke dry runs on a machine without triton
    triton = None


def environment() -> dict:
    """GPU name, versions, date and the TF32 / cuDNN flags that change what "fp32" means."""
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else "none (interpreter smoke run)",
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def write_results(out_dir: str, stem: str, dtype: str, rows: list[dict]) -> str:
    """Write ``{"env", "dtype", "rows"}`` to ``<out_dir>/<stem>_<gpu>_<dtype>_<date>.json``
    atomically (temporary file, then ``os.replace``); return the path."""
    env = environment()
    os.makedirs(out_dir, exist_ok=True)
    gpu = env["gpu"].replace(" ", "_")
    path = os.path.join(out_dir, f"{stem}_{gpu}_{dtype}_{env['date'][:10]}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"env": env, "dtype": dtype, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def time_interleaved(fns: dict, repeats: int, warmup: int = 3, base: str = "dense") -> dict:
    """Median over repeats of each fn's time and of its ratio to ``fns[base]`` within the same
    repeat (the machine is noisy: a ratio per repeat cancels what the repeat shares); the order
    is rotated every repeat. Returns ``{name: {median_ms, ratio_median, ratio_q1, ratio_q3}}``."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    out = {}
    for n in names:
        ratios = [t / d for t, d in zip(times[n], times[base])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [ratios[0]] * 3
        out[n] = {
            "median_ms": round(statistics.median(times[n]) * 1e3, 4),
            "ratio_median": round(statistics.median(ratios), 4),
            "ratio_q1": round(q[0], 4),
            "ratio_q3": round(q[2], 4),
        }
    return out


def cpu_environment() -> dict:
    """Machine, threads, versions, date, commit and command line of a CPU benchmark run, and the
    1-minute load average seen at the start (the benchmarks share a 2-core machine)."""
    import torch

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    ).stdout.strip()  # fmt: skip
    return {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "load_average_1min": os.getloadavg()[0],
    }


def write_json(path: str, payload: dict) -> str:
    """``payload`` to ``path`` atomically (temporary file, then ``os.replace``)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(path + ".tmp", path)
    return path
