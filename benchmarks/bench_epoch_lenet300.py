"""End-to-end target of issue 24: LeNet-300-100 trained sparse from initialisation at 98% (SNIP)
takes less time per epoch than the dense net, in the main loop of ``sparsekern.training``.

    python benchmarks/bench_epoch_lenet300.py [--threads 2] [--repeats 5] [--images 60000]

Three nets, the same batches, interleaved epochs (the order rotates every repeat), medians:
``dense`` (plain ``nn.Linear``s), ``sparsify-dense`` (the sparse modules with all-True masks),
``snip98`` (sparse modules, SNIP masks at 98% from one batch at initialisation; the execution
plan picks each layer's path). Each epoch is ``training.train_epoch`` with Nesterov SGD, batch
128, over ``--images`` MNIST training images. The plan of ``snip98`` is printed and saved, with
the ratios, to benchmarks/results/cpu_epoch_lenet300_t<threads>_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `models` is not installed

from _common import cpu_environment, time_interleaved, write_json  # noqa: E402

from models import LeNet300100  # noqa: E402
from sparsekern import training  # noqa: E402
from sparsekern.nn import execution_plan, sparsify  # noqa: E402
from sparsekern.pruning import SNIPPruner  # noqa: E402
from sparsekern.training.data import load_mnist, tensor_loader  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (runs: 1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--sparsity", type=float, default=0.98)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    if not 1 <= args.images <= 60000 or args.threads < 1 or args.repeats < 1:
        ap.error("expected 1 <= --images <= 60000, --threads >= 1, --repeats >= 1")
    torch.set_num_threads(args.threads)
    data = load_mnist(os.path.join(ROOT, "data", "mnist"))
    x, y = data["x_train"][: args.images], data["y_train"][: args.images]

    torch.manual_seed(0)
    nets = {"dense": LeNet300100()}
    nets["sparsify-dense"] = sparsify(LeNet300100())
    nets["sparsify-dense"].load_state_dict(nets["dense"].state_dict(), strict=False)
    sparse = sparsify(LeNet300100())
    sparse.load_state_dict(nets["dense"].state_dict(), strict=False)
    xb, yb = x[:128], y[:128]
    SNIPPruner(sparse, sparsity=args.sparsity).prune(
        closure=lambda: F.cross_entropy(sparse(xb), yb)
    )
    nets[f"snip{round(100 * args.sparsity)}"] = sparse
    opts = {
        k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        for k, m in nets.items()
    }
    gen = torch.Generator().manual_seed(0)

    def epoch(k):
        loader = tensor_loader(x, y, 128, True, gen)
        return lambda: training.train_epoch(nets[k], loader, opts[k])

    fns = {k: (lambda k=k: epoch(k)()) for k in nets}
    res = time_interleaved(fns, repeats=args.repeats, warmup=1, base="dense")
    plan = [
        {"layer": e.name, "path": e.path, "kept": round(e.kept, 4), "why": e.why}
        for e in execution_plan(sparse, training=True)
    ]
    for p in plan:
        print(f"  {p['layer']}: {p['path']} (kept {p['kept']:.3f}): {p['why']}")
    for k, r in res.items():
        print(f"{k:>16}: {r['median_ms'] / 1e3:.2f} s an epoch, {r['ratio_median']:.3f} x dense "
              f"(q1 {r['ratio_q1']:.3f}, q3 {r['ratio_q3']:.3f})")  # fmt: skip
    payload = {"env": cpu_environment(), "args": vars(args), "plan": plan, "epochs": res}
    day = dt.date.today().isoformat()
    name = f"cpu_epoch_lenet300_t{args.threads}_{day}.json"
    path = write_json(os.path.join(args.out, name), payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
