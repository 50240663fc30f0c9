"""CPU sparse conv training step: ``SparseConv2d`` (its automatic path), the sparse kernels forced
on, and SparseProp (when ``import sparseprop`` works) against ``nn.Conv2d`` with the same weights.

A step is forward + backward of ``(y * dy).sum()`` (dX, dW, dbias). 2 threads, the contenders
interleaved in one process (``_common.time_interleaved``), medians of per-repeat ratios to dense.
Layers: ResNet-18 layer3 (256->256 3x3, 14x14) and layer4 (512->512 3x3, 7x7), the strided
layer3 entry conv (128->256 3x3 s2, 28x28 in) and a 1x1 (256->256, 14x14); batch 32 unless
``--batch``; unstructured random masks at 50/90/95/98% sparsity. JSON to ``--out``.

SparseProp's two variants (vectorised over the batch, or over the output width) are both timed;
its own chooser picks the faster, so its best is what we compare with. It supports square
kernels, stride 1 or 2, fp32, no dilation.

    python benchmarks/bench_cpu_sparse_conv.py --out benchmarks/results [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from _common import cpu_environment, time_interleaved, write_json
from torch import nn

from sparsekern.nn import SparseConv2d
from sparsekern.ops.sparse_train.conv2d import extension_available, sparse_conv2d

LAYERS = {
    "layer3 3x3 256->256 14x14": (256, 256, 3, 1, 1, 14),
    "layer4 3x3 512->512 7x7": (512, 512, 3, 1, 1, 7),
    "layer3.0 3x3 s2 128->256 28x28": (128, 256, 3, 2, 1, 28),
    "1x1 256->256 14x14": (256, 256, 1, 1, 0, 14),
}
SPARSITIES = (0.5, 0.9, 0.95, 0.98)


def _sparseprop():
    try:
        import sparseprop.modules as spm
    except Exception:  # not installed or its extension failed: the benchmark runs without it
        return None
    return spm


def _step(layer, x, dy):
    def step():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        y = layer(x)
        y.backward(dy)

    return step


def _layers(cin, cout, k, s, p, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    dense = nn.Conv2d(cin, cout, k, stride=s, padding=p)
    mask = torch.rand(dense.weight.shape, generator=g) >= sparsity
    with torch.no_grad():
        dense.weight.mul_(mask)
    auto = SparseConv2d.from_dense(_copy(dense), mask)
    return dense, auto, _Forced(_copy(dense), mask)


class _Forced(nn.Module):
    """The sparse kernels whatever the rule says (the op itself on the layer's weights)."""

    def __init__(self, conv, mask):
        super().__init__()
        self.conv, self.mask = conv, mask

    def forward(self, x):
        c = self.conv
        return sparse_conv2d(x, c.weight, self.mask, c.bias, c.stride, c.padding, c.dilation)


def _copy(conv):
    c = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    c.load_state_dict(conv.state_dict())
    return c


def run(batch: int, repeats: int, names, sparsities, seed: int = 0) -> list[dict]:
    spm = _sparseprop()
    rows = []
    for name in names:
        cin, cout, k, s, p, hw = LAYERS[name]
        for sp in sparsities:
            dense, auto, forced = _layers(cin, cout, k, s, p, sp, seed)
            x = torch.randn(batch, cin, hw, hw, requires_grad=True)
            with torch.no_grad():
                dy = torch.randn_like(dense(x))
            fns = {
                "dense": _step(dense, x, dy),
                "SparseConv2d": _step(auto, x, dy),
                "sparse kernels": _step(forced, x, dy),
            }
            if spm is not None:
                for over_on in (False, True):
                    sp_layer = spm.SparseConv2d.from_dense(
                        _copy(dense), vectorizing_over_on=over_on
                    )
                    fns[f"sparseprop {'width' if over_on else 'batch'}"] = _step(sp_layer, x, dy)
            res = time_interleaved(fns, repeats)
            plan = auto.execution_path(tuple(x.shape), training=True)
            row = {
                "layer": name,
                "batch": batch,
                "sparsity": sp,
                "auto_path": plan.path,
                "auto_why": plan.why,
                **{f"{n} ratio": r["ratio_median"] for n, r in res.items()},
                **{f"{n} ms": r["median_ms"] for n, r in res.items()},
            }
            if spm is not None:
                row["sparseprop best ratio"] = min(
                    res["sparseprop batch"]["ratio_median"], res["sparseprop width"]["ratio_median"]
                )
            rows.append(row)
            print(
                f"{name:32s} B={batch} s={sp:.2f} dense {res['dense']['median_ms']:8.2f} ms | "
                + " | ".join(f"{n} {r['ratio_median']:.3f}" for n, r in res.items() if n != "dense")
                + f" | auto: {plan.path}",
                flush=True,
            )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="layer3 at 95%% only, 5 repeats")
    ap.add_argument("--layers", nargs="*", default=list(LAYERS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not extension_available():
        print("the C++ extension is unavailable: 'sparse kernels' is the fallback path")
    names, sps, reps = args.layers, SPARSITIES, args.repeats
    if args.quick:
        names, sps, reps = [next(iter(LAYERS))], (0.95,), 5
    env = cpu_environment()  # the load average at the start
    rows = run(args.batch, reps, names, sps)
    env |= {
        "command": " ".join(["python", *sys.argv]),
        "extension": extension_available(),
        "sparseprop": _sparseprop() is not None,
        "load_average_1min_end": os.getloadavg()[0],
    }
    path = write_json(
        os.path.join(args.out, f"cpu_sparse_conv_{env['date'][:10]}.json"),
        {"env": env, "rows": rows},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
