"""What a run records about itself: ``summary.json`` written atomically, the command, the git
commit and machine (:func:`run_info`), and a model's kept-weight figures and digests
(:func:`model_summary`). The experiments' tables (Han's Table 1, the methods table) live with the
scripts (``scripts/_lib/tables.py``)."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsekern.training.jsonlog import write_json  # noqa: F401  (re-exported)

__all__ = [
    "command_line",
    "model_summary",
    "git_commit",
    "run_info",
    "write_json",
]


def git_commit(root=None) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git work tree at ``root``
    (default: this package's folder). ``dirty``: tracked files outside ``results/`` differ from
    the commit, so the commit alone does not reproduce the run."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return {"commit": None, "dirty": None}
        # results/ is what runs write (their own summaries, figures): not the code's state
        st = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":(top)",
                ":(top,exclude)results",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": sha.stdout.strip(), "dirty": bool(st.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_info(root=None, device: torch.device | None = None) -> dict:
    """Where and with what a run ran: git commit, torch / Python versions, CPU, the vector ISA
    torch's CPU kernels dispatch to (``cpu_capability``: ``"AVX2"``, ``"AVX512"``, ...; float sums
    differ in their last bits between them), threads, GPU, the UTC date."""
    info = {
        **git_commit(root),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that reproduces this invocation: ``python scripts/x.py <args>``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", script, *args])


def model_summary(model: torch.nn.Module) -> dict:
    """The pruned model's figures: weights (Linear / Conv weights, the paper's count) dense and
    kept, biases, sparsity, compression (weights only, and with biases), kept % per sparse layer
    and in total, and SHA-256 digests of the masks and of the whole state dict (bit-identical
    runs have equal digests)."""
    from sparsekern.training.distributed import mask_digest, state_digest

    n_w = n_b = kept = 0
    kept_pct = {}
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            continue
        n_w += m.weight.numel()
        n_b += 0 if m.bias is None else m.bias.numel()
        mask = m._buffers.get("mask")
        k = m.weight.numel() if mask is None else int(mask.count_nonzero())
        kept += k
        if mask is not None:
            kept_pct[name] = 100 * k / m.weight.numel()
    return {
        "weights_dense": n_w,
        "weights_kept": kept,
        "biases": n_b,
        "sparsity": 1 - kept / n_w,
        "compression_weights": n_w / kept if kept else math.inf,
        "compression_params": (n_w + n_b) / (kept + n_b),
        "kept_pct": kept_pct | {"total": 100 * kept / n_w},
        "mask_sha256": mask_digest(model),
        "state_sha256": state_digest(model),
    }
