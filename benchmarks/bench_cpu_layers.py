"""CPU benchmark: SparseLinear / SparseConv2d against their dense twins with the same weights and
against torch.nn.utils.prune with the same mask, in one process, interleaved, medians of ratios.

    make bench                                        # everything, ~3 min on 2 cores
    .venv/bin/python benchmarks/bench_cpu_layers.py --quick   # fewer repeats
    .venv/bin/python benchmarks/bench_cpu_layers.py --only linear_train

Method (the machine is noisy): every repeat times dense, sparsekern and torch-prune back to back
(order rotated), a ratio is taken per repeat against that repeat's dense time, and the median
ratio is reported with the spread (25th-75th percentile). 2 threads. Nothing here asserts a time.

Targets (the masked-kernel issue): training step (forward + backward) <= 1.03x dense at 784->300
B=256 and <= 1.06x at 9216->4096 B=64; inference <= 1.01x at batch 1 and 64; SparseConv2d training
step <= 1.05x on VGG-16 conv shapes; always faster than torch.nn.utils.prune.

Writes ``benchmarks/results/cpu_layers_<date>.json`` (machine, versions, commit, rows).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # time the CPU path, not the interpreter

import torch  # noqa: E402
import torch.nn.utils.prune as prune  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _common import cpu_environment, time_interleaved, write_json  # noqa: E402

from sparsekern import SparseConv2d, SparseLinear, set_mask  # noqa: E402

DENSITY = 0.1
# (name, kind, builder args, input shape, mode)
LINEAR = [
    ("784->300 B=256", (784, 300), (256, 784)),
    ("300->100 B=256", (300, 100), (256, 300)),
    ("9216->4096 B=64", (9216, 4096), (64, 9216)),
]
LINEAR_INFER = [
    ("784->300 B=1", (784, 300), (1, 784)),
    ("784->300 B=64", (784, 300), (64, 784)),
    ("9216->4096 B=1", (9216, 4096), (1, 9216)),
    ("9216->4096 B=64", (9216, 4096), (64, 9216)),
]
# VGG-16 conv layers at small batches (a step must fit a few hundred ms on 2 cores)
CONV = [
    ("VGG conv3_2 256->256 56x56 B=1", (256, 256), (1, 256, 56, 56)),
    ("VGG conv4_2 512->512 28x28 B=2", (512, 512), (2, 512, 28, 28)),
    ("VGG conv5_2 512->512 14x14 B=8", (512, 512), (8, 512, 14, 14)),
]


def _linear_triple(fin: int, fout: int):
    torch.manual_seed(0)
    mask = torch.rand(fout, fin) < DENSITY
    sparse = SparseLinear(fin, fout)
    set_mask(sparse, mask)
    dense = nn.Linear(fin, fout)
    dense.load_state_dict({"weight": sparse.weight.detach(), "bias": sparse.bias.detach()})
    hooked = nn.Linear(fin, fout)
    hooked.load_state_dict(dense.state_dict())
    prune.custom_from_mask(hooked, "weight", mask)
    return {"dense": dense, "sparsekern": sparse, "torch_prune": hooked}


def _conv_triple(cin: int, cout: int):
    torch.manual_seed(0)
    sparse = SparseConv2d(cin, cout, 3, padding=1)
    mask = torch.rand(sparse.weight.shape) < DENSITY
    set_mask(sparse, mask)
    dense = nn.Conv2d(cin, cout, 3, padding=1)
    dense.load_state_dict({"weight": sparse.weight.detach(), "bias": sparse.bias.detach()})
    hooked = nn.Conv2d(cin, cout, 3, padding=1)
    hooked.load_state_dict(dense.state_dict())
    prune.custom_from_mask(hooked, "weight", mask)
    return {"dense": dense, "sparsekern": sparse, "torch_prune": hooked}


def _step_fn(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, train: bool):
    params = list(layer.parameters())
    if train:

        def step():
            for p in params:
                p.grad = None
            layer(x).backward(dy)

    else:

        def step():
            with torch.no_grad():
                layer(x)

    return step


def _repeats(base: int, dense_ms: float, quick: bool) -> int:
    budget = 2.0 if quick else 6.0  # seconds of dense time per case
    return max(7 if quick else 11, min(base, int(budget * 1e3 / max(dense_ms, 1e-3))))


def _probe_ms(fn) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run_case(group, name, layers, xshape, train, quick):
    x = torch.randn(*xshape)
    with torch.no_grad():
        dy = torch.randn_like(layers["dense"](x))
    fns = {k: _step_fn(m, x, dy, train) for k, m in layers.items()}
    repeats = _repeats(401, _probe_ms(fns["dense"]), quick)
    res = time_interleaved(fns, repeats)
    row = {"group": group, "case": name, "density": DENSITY, "repeats": repeats, **res}
    sk, tp = res["sparsekern"]["ratio_median"], res["torch_prune"]["ratio_median"]
    print(
        f"{group:13s} {name:32s} dense {res['dense']['median_ms']:9.3f} ms | sparsekern "
        f"{sk:5.3f}x [{res['sparsekern']['ratio_q1']:.3f}, {res['sparsekern']['ratio_q3']:.3f}]"
        f" | torch prune {tp:5.3f}x | n={repeats}",
        flush=True,
    )
    return row


def memory_rows() -> list[dict]:
    """Bytes per weight each path keeps beyond the dense layer (fp32 weights), read off the
    modules' buffers and the caches a training step fills, for a small and a large layer (the
    CPU mask pass caches an integer copy of the mask up to 4 M weights only)."""
    from sparsekern.ops._mask_cache import cached_bytes

    rows = []
    for fin, fout in ((784, 300), (9216, 4096)):
        layers = _linear_triple(fin, fout)
        n = fin * fout
        x = torch.randn(8, fin)
        for m in layers.values():
            m(x).sum().backward()
        sk = layers["sparsekern"]
        cached = cached_bytes(sk.mask)
        hooked = layers["torch_prune"]
        tp_extra = hooked.weight_mask.numel() * hooked.weight_mask.element_size()
        tp_extra += hooked.weight.numel() * hooked.weight.element_size()  # weight = orig * mask
        shape = f"{fin}->{fout}"
        rows.append(
            {"path": f"sparsekern {shape}", "bytes_per_weight": (sk.mask.numel() + cached) / n}
        )
        rows.append({"path": f"torch prune {shape}", "bytes_per_weight": tp_extra / n})
        del layers
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--only", help="linear_train, linear_infer or conv_train")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    groups = {
        "linear_train": [(n, _linear_triple(*a), s, True) for n, a, s in LINEAR],
        "linear_infer": [(n, _linear_triple(*a), s, False) for n, a, s in LINEAR_INFER],
        "conv_train": [(n, _conv_triple(*a), s, True) for n, a, s in CONV],
        "conv_infer": [(n, _conv_triple(*a), s, False) for n, a, s in CONV[-1:]],
    }
    for group, cases in groups.items():
        if args.only and args.only != group:
            continue
        for name, layers, xshape, train in cases:
            rows.append(run_case(group, name, layers, xshape, train, args.quick))
    mem = memory_rows()
    for m in mem:
        print(
            f"memory        {m['path']:32s} {m['bytes_per_weight']:.2f} bytes/weight beyond dense"
        )
    env = cpu_environment() | {"command": " ".join(["python", *sys.argv])}
    path = write_json(
        os.path.join(args.out, f"cpu_layers_{env['date'][:10]}.json"),
        {"env": env, "rows": rows, "memory": mem},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
