"""GPU benchmark of masked_linear against dense cuBLAS and torch's unfused masking.

    PYTHONPATH=. python3 benchmarks/bench_masked_linear.py                 # full sweep, bf16
    PYTHONPATH=. python3 benchmarks/bench_masked_linear.py --quick         # two shapes
    PYTHONPATH=. python3 benchmarks/bench_masked_linear.py --dtype float16 --out benchmarks/results
    python benchmarks/bench_masked_linear.py --smoke                       # tiny, no JSON

For each shape (M tokens, N out, K in) and density it times, with triton.testing.do_bench
(median of repeats, L2 flushed between runs), forward, backward and forward+backward of
  dense      F.linear(x, W, b)                          (cuBLAS; density ignored)
  unfused    F.linear(x, W*M, b), dW masked by autograd  (what torch.nn.utils.prune's hook does)
  module     masked_linear(x, W, M, b, assume_pruned_zero=True), W zero at pruned entries: what
             SparseLinear runs (cuBLAS forward and dX, cuBLAS dW + the mask pass)
  kernel_dw  the same with the fused Triton dW (dw_backend("kernel")): the mask in the epilogue,
             all-pruned tiles skipped (at these unstructured masks: none are)
  exact      masked_linear(x, W, M, b) for an arbitrary W (where(M, W, 0) per call)
and the peak memory of one forward+backward. The target: module fwd+bwd <= 1.02x dense at
M=8192, N=K=4096 bf16, peak memory <= dense + the mask. Prints a table of times and ratios to
dense, and writes JSON (GPU name, torch and triton versions, date, every number) under --out.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import write_results

from sparsekern.ops import dw_backend, masked_linear

# From LeNet-300-100's layers (batch 256) to a transformer-sized MLP GEMM (the issue's target).
SHAPES = [
    (256, 300, 784),
    (256, 100, 300),
    (4096, 4096, 4096),
    (8192, 4096, 4096),
    (8192, 11008, 4096),
]
QUICK_SHAPES = [(256, 300, 784), (8192, 4096, 4096)]
SMOKE_SHAPES = [(33, 20, 50)]
DENSITIES = [1.0, 0.5, 0.1]
VARIANTS = ("unfused", "module", "kernel_dw", "exact")


def _time(fn, *, grad_to_none) -> float:
    """Median milliseconds of ``fn`` over repeats (do_bench on CUDA; a host timer elsewhere, for
    the --smoke dry run)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(5):
        for p in grad_to_none or []:
            p.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mib(fn) -> float:
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _with_backend(name, f):
    def run():
        with dw_backend(name):
            return f()

    return run


def bench_case(M: int, N: int, K: int, density: float, dtype: torch.dtype, dev) -> dict:
    x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
    mask = torch.rand(N, K, device=dev) < density
    w = torch.randn(N, K, device=dev, dtype=dtype).masked_fill_(~mask, 0).requires_grad_()
    b = torch.randn(N, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=dev, dtype=dtype)
    params = [x, w, b]
    module = lambda: masked_linear(x, w, mask, b, assume_pruned_zero=True)  # noqa: E731
    impls = {
        "dense": lambda: F.linear(x, w, b),
        "unfused": lambda: F.linear(x, w * mask, b),
        "module": _with_backend("vendor", module),
        "kernel_dw": _with_backend("kernel", module),
        "exact": lambda: masked_linear(x, w, mask, b),
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
    for name in VARIANTS:
        row[name]["fwd_bwd_vs_dense"] = row[name]["fwd_bwd_ms"] / row["dense"]["fwd_bwd_ms"]
        row[name]["fwd_vs_dense"] = row[name]["fwd_ms"] / row["dense"]["fwd_ms"]
        row[name]["bwd_vs_dense"] = row[name]["bwd_ms"] / row["dense"]["bwd_ms"]
    # 3 GEMMs of 2*M*N*K FLOPs each in forward+backward.
    row["dense_tflops_fwd_bwd"] = 6 * M * N * K / row["dense"]["fwd_bwd_ms"] / 1e9
    row["module_tflops_fwd_bwd"] = 6 * M * N * K / row["module"]["fwd_bwd_ms"] / 1e9
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    ap.add_argument("--smoke", action="store_true", help="one tiny shape on any device, no JSON")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    args = ap.parse_args()
    if not (torch.cuda.is_available() or args.smoke):
        raise SystemExit("bench_masked_linear needs a CUDA GPU (the CPU path: `make bench`)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if dev.type == "cuda" else torch.float32
    shapes = SMOKE_SHAPES if args.smoke else QUICK_SHAPES if args.quick else SHAPES
    rows = []
    print(f"{'M':>6} {'N':>6} {'K':>6} {'d':>5} | {'dense ms':>9} | fwd+bwd / dense: "
          + " ".join(f"{v:>9}" for v in VARIANTS) + " | peak MiB dense/module")  # fmt: skip
    for M, N, K in shapes:
        for d in DENSITIES:
            r = bench_case(M, N, K, d, dtype, dev)
            rows.append(r)
            ratios = " ".join(f"{r[v]['fwd_bwd_vs_dense']:>9.3f}" for v in VARIANTS)
            print(
                f"{M:>6} {N:>6} {K:>6} {d:>5.2f} | {r['dense']['fwd_bwd_ms']:>9.3f} | "
                f"{'':16} {ratios} | {r['dense']['peak_mib']:.0f}/{r['module']['peak_mib']:.0f}",
                flush=True,
            )
    if not args.smoke:
        print(f"wrote {write_results(args.out, 'masked_linear', args.dtype, rows)}")


if __name__ == "__main__":
    main()
