"""GPU benchmark of masked_linear against dense cuBLAS and torch's unfused masking.

    PYTHONPATH=. python3 benchmarks/bench_masked_linear.py                 # full sweep, bf16
    PYTHONPATH=. python3 benchmarks/bench_masked_linear.py --quick         # two shapes
    PYTHONPATH=. python3 benchmarks/bench_masked_linear.py --dtype float16 --out benchmarks/results

For each shape (M tokens, N out, K in) and density it times, with triton.testing.do_bench
(median of repeats, L2 flushed between runs), forward, backward and forward+backward of
  dense     F.linear(x, W, b)                          (cuBLAS; density ignored)
  unfused   F.linear(x, W*M, b), dW masked by autograd  (what torch.nn.utils.prune's hook does)
  sparsek   sparsekern.ops.masked_linear(x, W, M, b)   (mask fused into the Triton GEMMs)
and the peak memory of one forward+backward. Prints a table of times and ratios to dense, and
writes JSON (GPU name, torch and triton versions, date, every number) under --out.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import write_results
from triton.testing import do_bench

from sparsekern.ops import masked_linear

# From LeNet-300-100's layers (batch 256) to a transformer-sized MLP GEMM (the issue's target).
SHAPES = [
    (256, 300, 784),
    (256, 100, 300),
    (4096, 4096, 4096),
    (8192, 4096, 4096),
    (8192, 11008, 4096),
]
QUICK_SHAPES = [(256, 300, 784), (8192, 4096, 4096)]
DENSITIES = [1.0, 0.5, 0.1]


def _time(fn, *, grad_to_none) -> float:
    """Median milliseconds of ``fn`` over repeats."""
    return do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_case(M: int, N: int, K: int, density: float, dtype: torch.dtype) -> dict:
    dev = torch.device("cuda")
    x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, device=dev, dtype=dtype, requires_grad=True)
    b = torch.randn(N, device=dev, dtype=dtype, requires_grad=True)
    mask = torch.rand(N, K, device=dev) < density
    dy = torch.randn(M, N, device=dev, dtype=dtype)
    params = [x, w, b]
    impls = {
        "dense": lambda: F.linear(x, w, b),
        "unfused": lambda: F.linear(x, w * mask, b),
        "sparsek": lambda: masked_linear(x, w, mask, b),
    }
    row = {"M": M, "N": N, "K": K, "density": density, "dtype": str(dtype).split(".")[-1]}
    for name, f in impls.items():
        with torch.no_grad():
            fwd = _time(f, grad_to_none=None)
        y = f()

        def bwd(y=y):
            y.backward(dy, retain_graph=True)

        t_bwd = _time(bwd, grad_to_none=params)
        del y

        def fwd_bwd(f=f):
            f().backward(dy)

        t_all = _time(fwd_bwd, grad_to_none=params)
        for p in params:
            p.grad = None
        peak = _peak_mib(fwd_bwd)
        row[name] = {"fwd_ms": fwd, "bwd_ms": t_bwd, "fwd_bwd_ms": t_all, "peak_mib": peak}
    for name in ("unfused", "sparsek"):
        row[name]["fwd_bwd_vs_dense"] = row[name]["fwd_bwd_ms"] / row["dense"]["fwd_bwd_ms"]
        row[name]["fwd_vs_dense"] = row[name]["fwd_ms"] / row["dense"]["fwd_ms"]
    # 3 GEMMs of 2*M*N*K FLOPs each in forward+backward.
    row["dense_tflops_fwd_bwd"] = 6 * M * N * K / row["dense"]["fwd_bwd_ms"] / 1e9
    row["sparsek_tflops_fwd_bwd"] = 6 * M * N * K / row["sparsek"]["fwd_bwd_ms"] / 1e9
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_masked_linear needs a CUDA GPU (the CPU path: `make bench`)")
    dtype = getattr(torch, args.dtype)
    rows = []
    hdr = f"{'M':>6} {'N':>6} {'K':>6} {'d':>5} | {'dense ms':>9} {'unfused':>9} {'sparsek':>9}"
    print(hdr + " | unf/dense  sk/dense | sk fwd/dense | peak MiB dense/unf/sk")
    for M, N, K in QUICK_SHAPES if args.quick else SHAPES:
        for d in DENSITIES:
            r = bench_case(M, N, K, d, dtype)
            rows.append(r)
            print(
                f"{M:>6} {N:>6} {K:>6} {d:>5.2f} | {r['dense']['fwd_bwd_ms']:>9.3f} "
                f"{r['unfused']['fwd_bwd_ms']:>9.3f} {r['sparsek']['fwd_bwd_ms']:>9.3f} | "
                f"{r['unfused']['fwd_bwd_vs_dense']:>9.2f} {r['sparsek']['fwd_bwd_vs_dense']:>9.2f}"
                f" | {r['sparsek']['fwd_vs_dense']:>12.2f} | {r['dense']['peak_mib']:.0f}/"
                f"{r['unfused']['peak_mib']:.0f}/{r['sparsek']['peak_mib']:.0f}",
                flush=True,
            )
    print(f"wrote {write_results(args.out, 'masked_linear', args.dtype, rows)}")


if __name__ == "__main__":
    main()
