"""How long ``to_inference`` takes to choose formats for whole torchvision models (issue 24,
item 6: resnet18 at 224 px and vit_b_16 under 20 s each; the issue measured 183 s and 238 s).

    PYTHONPATH=. python benchmarks/bench_calibration.py [--force]

Each model is sparsified, pruned to 90% by layer-wise magnitude, then exported with
``to_inference(model, example_input=x)`` (batch 1 at 224 px). ``--force`` times even when the
machine is loaded (the export itself would take the static rule then): the seconds are then an
upper bound and the choices noise. Prints seconds, layers, layers timed and reused.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torchvision

import sparsekern as sk
from sparsekern.nn import inference_choices
from sparsekern.nn.inference import chooser


def _prune(model, density=0.1):
    for _, m in sk.sparse_modules(model):
        w = m.weight.detach().abs().flatten()
        k = max(1, int(density * w.numel()))
        thr = w.kthvalue(w.numel() - k + 1).values
        sk.set_mask(m, m.weight.detach().abs() >= thr)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--force", action="store_true", help="time even on a loaded machine")
    ap.add_argument("--models", nargs="*", default=["resnet18", "vit_b_16"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    busy = chooser.machine_busy()
    print(f"load check: {busy or 'quiet'}")
    if args.force:
        chooser.machine_busy = lambda: None
    for name in args.models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _prune(sk.sparsify(getattr(torchvision.models, name)(weights=None)))
            x = torch.randn(1, 3, 224, 224)
            t = time.perf_counter()
            exported = sk.to_inference(model, example_input=x)
            sec = time.perf_counter() - t
        choices = inference_choices(exported).values()
        timed = sum(
            c.source == "calibrated" and not c.reason.startswith("as timed") for c in choices
        )
        reused = sum(c.reason.startswith("as timed") for c in choices)
        formats = {f: sum(c.format == f for c in choices) for f in ("dense", "csr", "bsr")}
        with torch.no_grad():
            diff = float((exported(x) - model(x)).abs().max())
        print(f"{name}: to_inference {sec:.1f} s, {len(choices)} layers, {timed} timed, "
              f"{reused} reused, formats {formats}, max |diff| {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
