"""GPU benchmark of the block-sparse linear kernels against dense cuBLAS and torch's BSR kernel.

    PYTHONPATH=. python3 benchmarks/bench_block_sparse.py                # full sweep, bf16
    PYTHONPATH=. python3 benchmarks/bench_block_sparse.py --quick        # a few cases (~1 min)
    PYTHONPATH=. python3 benchmarks/bench_block_sparse.py --blocks 64 128 --densities 0.1 0.05

For each shape (M rows of x, N out, K in), block size and density d (fraction of blocks kept,
chosen at random), it times with triton.testing.do_bench (median of repeats, L2 flushed between
runs) each GEMM separately and the whole training step:

  dense     cuBLAS: F.linear(x, W) / dy @ W / dy^T @ x, and F.linear forward+backward
  sparsek   sparsekern's kernels on a BlockSparseMatrix: forward, dX, dW (stored blocks only),
            and block_sparse_linear forward+backward
  smask     SparseLinear's block mode (dense weight, block mask): forward+backward
  torchbsr  torch's Triton BSR kernel (torch.sparse._triton_ops.bsr_dense_mm) on the same layout,
            forward only (it has no backward); F.linear with a BSR weight where that is missing

Ratios: ``t / (d x t_dense)`` (the issue's target is <= 1.1 at d in [0.05, 0.5], blocks >= 64:
>= 90% of cuBLAS per useful FLOP), ``t_torchbsr / t_sparsek`` (target >= 1.5), and useful TFLOP/s
(``2 M N K d / t``). JSON (GPU name, versions, date, every number) goes under --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# --smoke on a machine without a GPU runs the kernels through Triton's interpreter, which must be
# switched on before triton is imported.
if "--smoke" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import write_results  # noqa: E402

from sparsekern.formats.block_sparse import BlockSparseMatrix, block_grid  # noqa: E402
from sparsekern.ops.block_sparse_linear import (  # noqa: E402
    block_masked_linear,
    block_sparse_linear,
    bsr_dw_launch,
    bsr_dx_launch,
    bsr_fwd_launch,
    layout_of_mask,
    layout_of_matrix,
)

# (M, N, K): the GEMM target and AlexNet/VGG-16 FC layers at batch 1, 64, 256
# (fc6 of AlexNet 9216->4096, of VGG-16 25088->4096, fc7 4096->4096, fc8 4096->1000).
BIG = [(8192, 4096, 4096)]
FC = [(4096, 9216), (4096, 25088), (4096, 4096), (1000, 4096)]
SHAPES = BIG + [(b, n, k) for b in (1, 64, 256) for n, k in FC]
BLOCKS = [16, 32, 64, 128]
DENSITIES = [0.5, 0.25, 0.1, 0.05]
# Inference target: batch 1 on VGG-16's first FC layer at d = 0.04, >= 10x faster than dense.
INFERENCE = [((1, 4096, 25088), b, 0.04) for b in (32, 64, 128)]
QUICK = [((8192, 4096, 4096), 64, 0.1), ((8192, 4096, 4096), 128, 0.25), *INFERENCE[1:2]]
SMOKE = [((40, 64, 96), 16, 0.5), ((1, 64, 96), 32, 0.5)]


def _ms(fn, grad_to_none=None) -> float:
    """Median milliseconds: do_bench on CUDA; a host timer for the --smoke dry run."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=60, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(3):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _torch_bsr_fn(Wb: BlockSparseMatrix, x: torch.Tensor):
    """torch's BSR forward on the same layout: ``y^T = W_bsr @ x^T``, or None if unavailable."""
    bsr = Wb.to_sparse_bsr()  # padded to whole blocks: pad x's columns to match
    x = F.pad(x, (0, bsr.shape[1] - x.shape[1]))
    xt = x.t().contiguous()
    try:
        from torch.sparse._triton_ops import bsr_dense_mm

        bsr_dense_mm(bsr, xt)  # compile / check support once
        return "bsr_dense_mm", lambda: bsr_dense_mm(bsr, xt)
    except Exception as e:  # noqa: BLE001 - fall back, and say which path ran
        try:
            F.linear(x, bsr)
            return f"F.linear(bsr) [bsr_dense_mm failed: {type(e).__name__}]", lambda: F.linear(
                x, bsr
            )
        except Exception as e2:  # noqa: BLE001
            return f"unavailable: {type(e2).__name__}: {str(e2)[:120]}", None


def bench_case(M: int, N: int, K: int, block: int, density: float, dtype, device) -> dict:
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=dtype)
    w = torch.randn(N, K, device=dev, dtype=dtype)
    dy = torch.randn(M, N, device=dev, dtype=dtype)
    R, C = block_grid((N, K), (block, block))
    occ = torch.rand(R, C, device=dev, generator=g) < density
    if not occ.any():
        occ.view(-1)[0] = True
    mask = occ.repeat_interleave(block, 0).repeat_interleave(block, 1)[:N, :K].contiguous()
    Wb = BlockSparseMatrix.from_dense(w, (block, block), mask=mask)
    d = Wb.density
    lay = layout_of_matrix(Wb)
    row = {"M": M, "N": N, "K": K, "block": block, "density": d, "nnz_blocks": Wb.nnz_blocks}

    # dense cuBLAS, each GEMM and the step
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    row["dense"] = {
        "fwd_ms": _ms(lambda: F.linear(x, w)),
        "dx_ms": _ms(lambda: dy @ w),
        "dw_ms": _ms(lambda: dy.t() @ x),
        "step_ms": _ms(lambda: F.linear(xg, wg).backward(dy), grad_to_none=[xg, wg]),
    }
    # sparsekern on the compact format
    vals = Wb.values.detach().clone().requires_grad_()
    Wt = BlockSparseMatrix(vals, Wb.row_ptr, Wb.col_idx, Wb.shape, Wb.block_size)
    dw_buf = torch.zeros_like(Wb.values)
    row["sparsek"] = {
        "fwd_ms": _ms(lambda: bsr_fwd_launch(x, Wb.values, lay)),
        "dx_ms": _ms(lambda: bsr_dx_launch(dy, Wb.values, lay)),
        "dw_ms": _ms(lambda: bsr_dw_launch(dy, x, Wb.values, lay, out=dw_buf)),
        "step_ms": _ms(lambda: block_sparse_linear(xg, Wt).backward(dy), grad_to_none=[xg, vals]),
    }
    # SparseLinear's block mode: dense weight + block mask
    wm = (w * mask).requires_grad_()
    layout_of_mask(mask, (block, block))  # built once, cached on the mask
    row["smask"] = {
        "step_ms": _ms(
            lambda: block_masked_linear(xg, wm, mask, None, block).backward(dy),
            grad_to_none=[xg, wm],
        )
    }
    # torch's BSR kernel on the same layout (forward only)
    how, fn = _torch_bsr_fn(Wb, x)
    row["torchbsr"] = {"how": how, "fwd_ms": _ms(fn) if fn is not None else None}

    flops = 2.0 * M * N * K
    for op in ("fwd", "dx", "dw", "step"):
        t_d, t_s = row["dense"][f"{op}_ms"], row["sparsek"][f"{op}_ms"]
        row["sparsek"][f"{op}_vs_d_dense"] = t_s / (d * t_d)  # target <= 1.1
        n_gemm = 3 if op == "step" else 1
        row["sparsek"][f"{op}_useful_tflops"] = n_gemm * flops * d / t_s / 1e9
        row["dense"][f"{op}_tflops"] = n_gemm * flops / t_d / 1e9
    row["sparsek"]["fwd_speedup_vs_dense"] = row["dense"]["fwd_ms"] / row["sparsek"]["fwd_ms"]
    tb = row["torchbsr"]["fwd_ms"]
    row["torchbsr"]["vs_sparsek_fwd"] = tb / row["sparsek"]["fwd_ms"] if tb else None
    return row


def plot_sweep(rows: list[dict], path: str) -> str | None:
    """Time over dense time vs density, one line per block size, for M=8192 N=K=4096 (fwd, dX,
    dW, step); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    big = [r for r in rows if "error" not in r and (r["M"], r["N"], r["K"]) == BIG[0]]
    if not big:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharey=True)
    for ax, op in zip(axes, ("fwd", "dx", "dw", "step")):
        for block in sorted({r["block"] for r in big}):
            pts = sorted(
                (r["density"], r["sparsek"][f"{op}_ms"] / r["dense"][f"{op}_ms"])
                for r in big
                if r["block"] == block
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{block}x{block}")
        ax.plot([0, 0.5], [0, 0.5], "k:", label="d x dense")
        ax.set_title(f"{op}, M=8192 N=K=4096")
        ax.set_xlabel("block density")
    axes[0].set_ylabel("time / cuBLAS dense time")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="a few cases only")
    ap.add_argument("--blocks", type=int, nargs="+", default=BLOCKS)
    ap.add_argument("--densities", type=float, nargs="+", default=DENSITIES)
    ap.add_argument("--batches", type=int, nargs="+", help="keep only shapes with these M")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device, no JSON")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    args = ap.parse_args()
    if not (torch.cuda.is_available() or args.smoke):
        raise SystemExit("bench_block_sparse needs a CUDA GPU (or --smoke)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if device == "cuda" else torch.float32
    if args.smoke:
        cases = SMOKE
    elif args.quick:
        cases = QUICK
    else:
        shapes = [s for s in SHAPES if not args.batches or s[0] in args.batches]
        cases = [(s, b, d) for s in shapes for b in args.blocks for d in args.densities]
        cases += [c for c in INFERENCE if c[1] in args.blocks]
    print(
        f"{'M':>5} {'N':>5} {'K':>5} {'blk':>4} {'d':>5} | t/(d*dense): fwd   dx   dw  step |"
        " useful TF/s fwd | dense fwd ms | fwd x dense | torchbsr/sk"
    )
    rows = []
    for (M, N, K), block, d in cases:
        try:
            r = bench_case(M, N, K, block, d, dtype, device)
        except Exception as e:  # noqa: BLE001 - record and go on with the sweep
            rows.append({"M": M, "N": N, "K": K, "block": block, "density": d, "error": repr(e)})
            print(f"{M:>5} {N:>5} {K:>5} {block:>4} {d:>5.2f} | ERROR {e!r}"[:200], flush=True)
            continue
        rows.append(r)
        s = r["sparsek"]
        tb = r["torchbsr"]["vs_sparsek_fwd"]
        print(
            f"{M:>5} {N:>5} {K:>5} {block:>4} {r['density']:>5.2f} | "
            f"{s['fwd_vs_d_dense']:>15.2f} {s['dx_vs_d_dense']:>4.2f} {s['dw_vs_d_dense']:>4.2f} "
            f"{s['step_vs_d_dense']:>5.2f} | {s['fwd_useful_tflops']:>15.1f} | "
            f"{r['dense']['fwd_ms']:>12.4f} | {s['fwd_speedup_vs_dense']:>11.2f} | "
            f"{'n/a' if tb is None else f'{tb:.2f}'}",
            flush=True,
        )
    if args.smoke:
        print("smoke run: no JSON written")
        return
    stem = "block_sparse_quick" if args.quick else "block_sparse"
    path = write_results(args.out, stem, args.dtype, rows)
    print(f"wrote {path}")
    png = plot_sweep(rows, path.replace(".json", ".png"))
    if png:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
