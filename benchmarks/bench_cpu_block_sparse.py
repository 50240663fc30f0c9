"""CPU benchmark of the block-sparse path: inference (``block_sparse_linear`` on a compact
BlockSparseMatrix) and block-mode training (``SparseLinear(block_size=...)``) against the dense
layer with the same weights and torch's own BSR product on the same layout, in one process,
interleaved, medians of per-repeat ratios.

    make bench                                                   # with the other CPU benchmarks
    .venv/bin/python benchmarks/bench_cpu_block_sparse.py        # targets + sweep + plot, ~4 min
    .venv/bin/python benchmarks/bench_cpu_block_sparse.py --quick --no-sweep

"sparsekern" is the op (``block_sparse_linear``), "exported layer" the ``BlockSparseLinear`` module
that ``to_inference`` exports (a cached torch BSR tensor, no per-call checks).
Targets (the block-sparse issue), 9216->4096 with 10% of its 32x32 blocks: exported inference
>= 4x faster than dense at batch 1 and >= 2.5x at batch 64, never slower than torch's own BSR
matmul; block-mode training step (forward + backward) >= 2x faster than dense at batch 64.
The sweep (time vs density per block size, batch 64) goes to a PNG next to the JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # time the CPU path, not the interpreter

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _common import cpu_environment, time_interleaved, write_json  # noqa: E402

from sparsekern import BlockSparseMatrix, SparseLinear, set_mask  # noqa: E402
from sparsekern.formats.block_sparse import block_grid  # noqa: E402
from sparsekern.nn import BlockSparseLinear  # noqa: E402
from sparsekern.ops import block_sparse_linear  # noqa: E402

FIN, FOUT = 9216, 4096


def _block_mask(fout, fin, block, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    R, C = block_grid((fout, fin), (block, block))
    occ = torch.rand(R, C, generator=g) < density
    return occ.repeat_interleave(block, 0).repeat_interleave(block, 1)[:fout, :fin].contiguous()


def _repeats(fn, quick: bool) -> int:
    import time

    fn()
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    budget = 1.5 if quick else 5.0
    return max(7, min(301, int(budget * 1e3 / max(ms, 1e-3))))


def inference_case(batch: int, block: int, density: float, quick: bool) -> dict:
    torch.manual_seed(0)
    mask = _block_mask(FOUT, FIN, block, density)
    w = torch.randn(FOUT, FIN) * mask
    b = torch.randn(FOUT)
    W = BlockSparseMatrix.from_dense(w, (block, block), mask=mask)
    # each contender reads its own copy of the blocks: interleaved calls sharing one copy would
    # find it in cache (14.7 MB here) and favour each other over the one with its own
    t = W.to_sparse_bsr()
    bsr = torch.sparse_bsr_tensor(t.crow_indices(), t.col_indices(), t.values().clone(), t.shape)
    x = torch.randn(batch, FIN)

    def dense():
        with torch.no_grad():
            F.linear(x, w, b)

    def sparsekern():
        with torch.no_grad():
            block_sparse_linear(x, W, b)

    def torch_bsr():
        with torch.no_grad():
            torch.sparse.mm(bsr, x.t()).t() + b

    layer = BlockSparseLinear(W, b).eval()  # what to_inference exports for this layer

    def exported():
        with torch.no_grad():
            layer(x)

    fns = {"dense": dense, "sparsekern": sparsekern, "torch_bsr": torch_bsr, "exported": exported}
    res = time_interleaved(fns, _repeats(dense, quick))
    return {"kind": "inference", "batch": batch, "block": block, "density": W.density, **res}


def training_case(batch: int, block: int, density: float, quick: bool) -> dict:
    torch.manual_seed(0)
    sparse = SparseLinear(FIN, FOUT, block_size=block)
    set_mask(sparse, _block_mask(FOUT, FIN, block, density))
    dense = nn.Linear(FIN, FOUT)
    dense.load_state_dict({"weight": sparse.weight.detach(), "bias": sparse.bias.detach()})
    x = torch.randn(batch, FIN)
    dy = torch.randn(batch, FOUT)

    def step(layer):
        def run():
            layer.weight.grad = layer.bias.grad = None
            layer(x).backward(dy)

        return run

    fns = {"dense": step(dense), "sparsekern": step(sparse)}
    res = time_interleaved(fns, _repeats(fns["dense"], quick))
    return {"kind": "training", "batch": batch, "block": block, "density": sparse.density, **res}


def _print(r: dict) -> None:
    sk = r["sparsekern"]
    speed = 1 / sk["ratio_median"]
    extra = ""
    if "torch_bsr" in r:
        extra = f" | vs torch BSR {r['torch_bsr']['ratio_median'] / sk['ratio_median']:.2f}x"
    if "exported" in r:
        ex = r["exported"]["ratio_median"]
        extra += (f" | exported layer {1 / ex:5.2f}x faster, vs torch BSR "
                  f"{r['torch_bsr']['ratio_median'] / ex:.2f}x")  # fmt: skip
    print(
        f"{r['kind']:9s} B={r['batch']:<3d} block {r['block']:>3d} d={r['density']:.3f} | "
        f"dense {r['dense']['median_ms']:9.3f} ms | sparsekern {speed:5.2f}x faster "
        f"[{1 / sk['ratio_q3']:.2f}, {1 / sk['ratio_q1']:.2f}]{extra}",
        flush=True,
    )


def _plot(rows: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("inference", "training")):
        for block in sorted({r["block"] for r in rows if r["kind"] == kind}):
            pts = sorted(
                (r["density"], r["sparsekern"]["ratio_median"])
                for r in rows
                if r["kind"] == kind and r["block"] == block
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{block}x{block}")
        ax.plot([0, 0.5], [0, 0.5], "k:", label="density x dense")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("block density")
        ax.set_ylabel("time / dense time")
        ax.set_title(f"{FIN}->{FOUT}, batch 64, {kind} (CPU, 2 threads)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--no-sweep", action="store_true", help="the target cases only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    env = cpu_environment() | {"command": " ".join(["python", *sys.argv])}
    print(f"load average at start: {env['load_average_1min']:.2f}")
    rows = []
    for batch in (1, 64):
        rows.append(inference_case(batch, 32, 0.1, args.quick))
        _print(rows[-1])
    rows.append(training_case(64, 32, 0.1, args.quick))
    _print(rows[-1])
    sweep = []
    if not args.no_sweep:
        for block in (16, 32, 64):
            for density in (0.05, 0.1, 0.25, 0.5):
                for case in (inference_case, training_case):
                    sweep.append(case(64, block, density, True))
                    _print(sweep[-1])
    date = env["date"][:10]
    path = write_json(
        os.path.join(args.out, f"cpu_block_sparse_{date}.json"),
        {"env": env, "targets": rows, "sweep": sweep},
    )
    print(f"wrote {path}")
    if sweep:
        png = _plot(sweep, os.path.join(args.out, f"cpu_block_sparse_{date}.png"))
        print(f"wrote {png}" if png else "matplotlib missing: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
