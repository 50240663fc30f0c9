"""What the GPU benchmarks share: the environment record and the atomic JSON write.

Imported as ``from _common import ...``: the benchmarks run as scripts from this folder
(``python3 benchmarks/bench_x.py``), which puts it first on ``sys.path``."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform

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
