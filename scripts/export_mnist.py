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
sys.path.insert(0, str(ROOT))  # run from a checkout without installing: `models`, `sparsekern`

from models import build_model  # noqa: E402
from sparsekern.formats import load_compressed  # noqa: E402
from sparsekern.nn.inference import format_report, inference_report  # noqa: E402
from sparsekern.training import report  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
p.add_argument("run_dir", type=Path, help="a prune_mnist output folder (summary.json, *.skr)")
p.add_argument("--threads", type=int, default=1, help="torch threads (prune_mnist's default: 1)")
p.add_argument("--budget", type=float, default=5.0, help="seconds per batch size, at most")
args = p.parse_args()

summary = json.loads((args.run_dir / "summary.json").read_text())
torch.manual_seed(0)
torch.set_num_threads(args.threads)
model = build_model(summary["model"], sparse=True, dropout=summary["args"]["dropout"])
model = load_compressed(args.run_dir / summary["compressed_file"]["path"], model).eval()
example = torch.randn(1, 1, 28, 28)  # MNIST's shape; the timing inputs are random anyway
rep = inference_report(model, example, (1, 64), budget_s=args.budget)
command = report.command_line("scripts/export_mnist.py")
rep = {"command": command, "run": report.run_info(ROOT), **rep}
report.write_json(args.run_dir / "inference.json", rep)
print(f"{summary['network']} ({rep['threads']} thread(s)):\n{format_report(rep)}")
