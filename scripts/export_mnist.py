"""The inference export of a finished prune_mnist run, timed again: RUN_DIR/inference.json.

    python scripts/export_mnist.py results/lenet300     # LeNet-300-100, 1 thread (as trained)
    python scripts/export_mnist.py results/lenet5 --threads 2

Loads RUN_DIR/<model>_pruned.skr (Han's relative-index file) into the run's architecture, exports
it with ``sparsekern.to_inference`` (per layer dense / CSR / BSR, calibrated on this machine) and
times it against the dense model with the same weights at batch 1 and 64, interleaved, medians
(``sparsekern.nn.inference_report``). prune_mnist.py writes the same file at the end of a run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: `models` and `scripts._lib` are not installed

from models import build_model  # noqa: E402
from scripts._lib import checks  # noqa: E402
from sparsekern.formats import load_compressed  # noqa: E402
from sparsekern.nn.inference import format_report, inference_report  # noqa: E402
from sparsekern.training import report  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("run_dir", type=Path, help="a prune_mnist output folder (summary.json, *.skr)")
    p.add_argument("--threads", type=checks.number(int, 1), default=1,
                   help="torch threads (prune_mnist's default: 1)")  # fmt: skip
    p.add_argument("--budget", type=checks.number(float, 0, lo_open=True), default=5.0,
                   help="seconds per batch size, at most")  # fmt: skip
    args = p.parse_args(argv)
    if not (args.run_dir / "summary.json").is_file():
        p.error(f"argument run_dir: expected a prune_mnist output folder, got {args.run_dir}")
    try:
        args.summary = json.loads((args.run_dir / "summary.json").read_text())
        args.skr = args.run_dir / args.summary["compressed_file"]["path"]
        args.model = args.summary["model"]
    except (ValueError, KeyError, TypeError) as e:
        p.error(f"argument run_dir: {args.run_dir}/summary.json is not a prune_mnist summary ({e})")
    if not args.skr.is_file():
        p.error(f"argument run_dir: expected {args.skr} (the pruned model), found none")
    return args


def main(argv=None):
    args = parse_args(argv)
    summary = args.summary
    torch.set_num_threads(args.threads)
    model = build_model(args.model, sparse=True, dropout=summary["args"]["dropout"])
    model = load_compressed(args.skr, model).eval()
    torch.manual_seed(0)
    example = torch.randn(1, 1, 28, 28)  # MNIST's shape; the timing inputs are random anyway
    rep = inference_report(model, example, (1, 64), budget_s=args.budget)
    command = report.command_line("scripts/export_mnist.py", argv)
    rep = {"command": command, "run": report.run_info(ROOT), **rep}
    report.write_json(args.run_dir / "inference.json", rep)
    print(f"{summary['network']} ({rep['threads']} thread(s)):\n{format_report(rep)}")
    return rep


if __name__ == "__main__":
    main()
