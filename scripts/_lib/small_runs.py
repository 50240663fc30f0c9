"""What the small MNIST reproductions (packnet, omni, multitask, federated) share: the checked
command line, the recorded summary and the header of their README table."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from scripts._lib import checks
from sparsekern.training.report import command_line, run_info, write_json

ROOT = Path(__file__).resolve().parents[2]


def parse_run_args(doc: str, presets: dict, name: str, argv=None) -> argparse.Namespace:
    """``--preset`` (default "full"), ``--data``, ``--out`` (default ``results/<name>``),
    checked: a missing data folder or an ``--out`` that is a file exits 2 before any work."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(presets), default="full")
    ap.add_argument("--data", default=str(ROOT / "data" / "mnist"))
    ap.add_argument("--out", default=str(ROOT / "results" / name))
    args = ap.parse_args(argv)
    checks.check_data_dir(ap, "--data", args.data)
    checks.check_out_dir(ap, "--out", args.out)
    return args


def save_run(
    name: str, argv, args, t0: float, write_table: Callable[[Path, dict], None], **fields
) -> dict:
    """``summary.json`` (command, preset, ``fields`` in order, seconds since ``t0``, run info)
    and the README table ``write_table(out, summary)`` under ``args.out``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"command": command_line(f"scripts/{name}_mnist.py", argv), "preset": args.preset}
    summary |= fields | {"seconds": time.time() - t0, "run": run_info(ROOT)}
    write_json(out / "summary.json", summary)
    write_table(out, summary)
    return summary


def run_header(summary: dict) -> list[str]:
    """The README lines naming the command, the commit and the time."""
    run = summary["run"]
    return [
        f"Command: `{summary['command']}`  ",
        f"Commit: `{run['commit']}` (dirty: {run['dirty']}); {summary['seconds']:.0f} s on a "
        "shared 2-core CPU.",
    ]
