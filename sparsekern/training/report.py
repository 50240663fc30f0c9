"""Reports: Han et al.'s Table 1 next to this run, ``summary.json`` with what reproduces it (the
command, every argument, the git commit), and the methods comparison table.

Table 2's per-layer columns are :func:`sparsekern.pruning.layer_report` /
:func:`sparsekern.pruning.format_report`.
"""

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
    "format_results",
    "model_summary",
    "format_table1",
    "git_commit",
    "label_rows",
    "methods_table",
    "run_info",
    "table1_rows",
    "write_json",
]

METRIC_NAMES = {"error": "Error", "top1_error": "Top-1 err", "top5_error": "Top-5 err"}


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
    """Where and with what a run ran: git commit, torch / Python versions, CPU, threads, GPU,
    the UTC date."""
    info = {
        **git_commit(root),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def table1_rows(
    paper: dict, dense: dict | None, pruned: dict, params_dense: int, params_pruned: int
) -> list[dict]:
    """Han et al.'s Table 1 rows for one network, the paper's and this run's.

    Args:
        paper: ``{"name", "dense": {metric: %}, "pruned": {metric: %}, "params_dense",
            "params_pruned", "compression"}`` (``models.paper.HAN_2015``); metrics ``"error"``
            (MNIST) or ``"top1_error"`` / ``"top5_error"`` (ImageNet).
        dense: this run's metrics of the net pruning started from (None: no dense net, e.g.
            SNIP or RigL, which are sparse from the start).
        pruned: this run's metrics of the pruned net.
        params_dense, params_pruned: this run's parameters (weights + biases).
    """
    name = paper["name"]
    keys = list(paper["dense"])
    pick = lambda d: None if d is None else {k: d[k] for k in keys}  # noqa: E731
    return [
        {"network": f"{name} Ref (paper)", **pick(paper["dense"]),
         "parameters": paper["params_dense"], "compression": None},
        {"network": f"{name} Pruned (paper)", **pick(paper["pruned"]),
         "parameters": paper["params_pruned"], "compression": paper["compression"]},
        {"network": f"{name} Ref (this run)", **(pick(dense) or dict.fromkeys(keys)),
         "parameters": params_dense if dense is not None else None, "compression": None},
        {"network": f"{name} Pruned (this run)", **pick(pruned),
         "parameters": params_pruned, "compression": params_dense / params_pruned},
    ]  # fmt: skip


def _params(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def format_table1(rows: list[dict]) -> str:
    """The rows of :func:`table1_rows` as a text table."""
    keys = [k for k in rows[0] if k in METRIC_NAMES]
    width = max(len(r["network"]) for r in rows) + 2
    head = f"{'Network':<{width}}" + "".join(f"{METRIC_NAMES[k]:>11}" for k in keys)
    lines = [head + f"{'Parameters':>12}{'Compression':>13}"]
    for r in rows:
        vals = "".join(f"{'-':>11}" if r[k] is None else f"{r[k]:>10.2f}%" for k in keys)
        comp = "" if r["compression"] is None else f"{r['compression']:.1f}x"
        lines.append(f"{r['network']:<{width}}{vals}{_params(r['parameters']):>12}{comp:>13}")
    return "\n".join(lines)


def methods_table(summaries: list[dict], networks: dict, paper: dict) -> str:
    """A markdown table of MNIST method runs (their ``summary.json``), sorted by model, target
    sparsity, budget and method: test error, sparsity reached, the papers' figures, wall time,
    kept % per layer.

    Args:
        summaries: the runs' summaries (``args`` with ``model``, ``method``, ``sparsity``).
        networks: ``{model: network name}``.
        paper: ``{model: {method: [(sparsity %, error %), ...]}}``.
    """
    rows = []
    order = ("han", "global", "gradual", "snip", "rigl", "nm")
    for s in summaries:
        a = s["args"]
        per = ", ".join(f"{n} {v:.1f}" for n, v in s["kept_pct"].items() if n != "total")
        ref = paper.get(a["model"], {}).get(a["method"], [])
        target = a.get("sparsity")
        figures = "; ".join(
            f"{sp:g}% / {e:g}%"
            for sp, e in ref
            if a["method"] != "snip" or (target is not None and sp == round(100 * target))
        )
        rank = order.index(a["method"]) if a["method"] in order else len(order)
        rows.append(
            (a["model"], target or 0.0, s["epochs"], rank, a["method"], s["error_pct"],
             100 * s["sparsity"], figures or "-", s["wall_time_s"], per)
        )  # fmt: skip
    rows.sort()
    out = [
        "| model | target sparsity | method | epochs | test error % | sparsity reached % "
        "| paper: sparsity / error | wall s | kept % per layer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, sp, epochs, _, method, err, reached, figures, wall, per in rows:
        out.append(
            f"| {networks.get(model, model)} | {100 * sp:.0f}% | {method} | {epochs} | "
            f"{err:.2f} | {reached:.2f} | {figures} | {wall:.0f} | {per} |"
        )
    return "\n".join(out)


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


def format_results(
    table1: list[dict], rows: list[dict], paper_kept: dict, comp: dict, figures: dict, what: str
) -> str:
    """The end-of-run report: Table 1 (``table1_rows``) on ``what`` (e.g. "10,000 test
    images"), the weights-only compression (``figures``: :func:`model_summary`), Table 2's
    per-layer columns (``layer_report`` rows) with the paper's kept % per layer, and the
    compressed file (``save_compressed`` report)."""
    from sparsekern.pruning import format_report

    paper = ", ".join(f"{k} {v:g}%" for k, v in paper_kept.items())
    kb = comp["file_bytes"] / 1e3
    size = f"{kb / 1e3:.2f} MB" if kb >= 1e3 else f"{kb:.1f} KB"
    return "\n".join(
        [
            f"Table 1 (Han et al. 2015) vs this run ({what})",
            format_table1(table1),
            f"(weights only: {figures['weights_dense']:,} -> {figures['weights_kept']:,}, "
            f"{figures['compression_weights']:.1f}x)",
            "",
            f"Table 2 columns, per layer (paper's weights kept: {paper})",
            format_report(rows),
            "",
            f"compressed model {comp['path']}: {size} vs {comp['dense_bytes'] / 1e6:.2f} MB "
            f"dense ({comp['compression_ratio']:.1f}x); index overhead "
            f"{100 * comp['index_overhead']:.1f}% of the values (paper 15.6%)",
        ]
    )


def label_rows(rows: list[dict], names: dict[str, str], keep: dict[str, float]) -> list[dict]:
    """Put the paper's layer names on ``layer_report`` rows, in place: ``names`` is ``{paper
    name: module name}``; each matching row gets ``layer = "fc6 (classifier.1)"``,
    ``paper_name`` and ``paper_weights_kept_pct`` (from ``keep``, kept fractions)."""
    by_module = {m: p for p, m in names.items()}
    for row in rows:
        p = by_module.get(row["layer"])
        if p is not None:
            row["paper_name"], row["paper_weights_kept_pct"] = p, 100 * keep[p]
            row["layer"] = p if p == row["layer"] else f"{p} ({row['layer']})"
    return rows
