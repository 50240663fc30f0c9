"""GPU benchmark of the unstructured sparse-training kernels (sparsekern.ops.sparse_train.triton_*)
against cuBLAS dense and cuSPARSE, at issue 24's target shape.

    PYTHONPATH=. python3 benchmarks/bench_sparse_train_gpu.py --quick   # d = 0.05/0.02/0.1 (~1 min)
    PYTHONPATH=. python3 benchmarks/bench_sparse_train_gpu.py           # + batches 64..16384
    PYTHONPATH=. python3 benchmarks/bench_sparse_train_gpu.py --smoke   # tiny shapes, any device

For W [N, K] at density d (each weight kept with probability d, CSR, int32 indices) and a batch of
M columns, feature-major operands (x^T [K, M], dy^T [N, M]: the kernels' coalesced layout, see
sparsekern/ops/sparse_train/triton_common.py), it first checks every product against float64,
then times with triton.testing.do_bench (median, L2 flushed between runs):

  spmm (forward y^T = W x^T; dX is the same product on W^T's CSR):
    dense      cuBLAS: torch.matmul(W, x^T), W dense with the zeros
    rows       sparsekern's row-split CSR kernel (CUDA cores)
    dot        sparsekern's panel kernel on tensor cores (incl. its per-call panel_select and
               isfinite check of x)
    cusparse   torch CSR matmul (cuSPARSE SpMM) on the same CSR
  sddmm (dW at the mask, dW = dy^T x):
    dense      cuBLAS: dy^T @ x (the whole dense gradient)
    dot        sparsekern's SDDMM kernel
    cusparse   torch.sparse.sampled_addmm (cuSPARSE SDDMM)
  transpose    x.t().contiguous(), what a row-major caller pays once per layer for the layout

Ratios are dense time / time (> 1: faster than cuBLAS); useful TFLOP/s = 2 nnz M / t. JSON (GPU
name, torch / triton versions, date, every number, the autotuner's pick) goes under --out. These
kernels are not the CUDA default of any layer until this benchmark shows them faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

# --smoke on a machine without a GPU runs the kernels through Triton's interpreter, which must be
# switched on before triton is imported.
if "--smoke" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from _common import write_results  # noqa: E402

from sparsekern.ops.sparse_train import triton_sddmm as sd  # noqa: E402
from sparsekern.ops.sparse_train import triton_spmm as sp  # noqa: E402
from sparsekern.ops.sparse_train.triton_common import BENCH_SHAPE, bench_csr  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

# (M batch, N, K, density): the target first.
TARGET = (BENCH_SHAPE["M"], BENCH_SHAPE["N"], BENCH_SHAPE["K"])
QUICK = [(*TARGET, d) for d in (0.05, 0.02, 0.1)]
FULL = QUICK + [(m, 4096, 4096, d) for m in (64, 256, 1024, 16384) for d in (0.05, 0.02)]
SMOKE = [(24, 40, 56, 0.1), (70, 37, 45, 0.3)]
# |got - ref| <= TOL x max(1, max|ref|): the output's rounding (bf16: 2^-8 relative), with margin
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _ms(fn) -> float:
    """Median milliseconds: do_bench on CUDA; a host timer for the --smoke dry run."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=60, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _error(got: torch.Tensor, ref: torch.Tensor, dtype) -> dict:
    """Max abs error against float64 and whether it is within ``TOL x max(1, max|ref|)``."""
    err = float((got.double() - ref).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    ok = err <= TOL[dtype] * max(scale, 1.0)
    return {"max_abs_err": err, "ref_max": scale, "ok": bool(ok)}


def _best(kernel) -> str | None:
    cfg = getattr(kernel, "best_config", None)
    return None if cfg is None else str(cfg)


def _try(label: str, make):
    """``(fn, note)``: the vendor call if it runs here, else ``(None, why)``."""
    try:
        fn = make()
        fn()
        return fn, label
    except Exception as e:  # noqa: BLE001 - record which vendor path is missing, go on
        return None, f"unavailable: {type(e).__name__}: {str(e)[:160]}"


def bench_case(M: int, N: int, K: int, d: float, dtype, device) -> dict:
    row_ptr, col, values = bench_csr(d, N, K, device, dtype, seed=0)
    nnz = values.numel()
    rows = torch.repeat_interleave(
        torch.arange(N, device=device), torch.diff(row_ptr.long()), output_size=nnz
    )
    w = torch.zeros(N, K, device=device, dtype=dtype)
    w[rows, col.long()] = values
    x = torch.randn(M, K, device=device, dtype=dtype)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    xt, dyt = x.t().contiguous(), dy.t().contiguous()
    out = {"M": M, "N": N, "K": K, "density": d, "nnz": nnz, "dtype": str(dtype)}

    # correctness against float64 first (a wrong kernel is not timed)
    ref_y = w.double() @ xt.double()
    ref_dw = (dyt.double() @ xt.double().t())[rows, col.long()]
    check = {
        "spmm_rows": _error(sp.spmm(row_ptr, col, values, xt, N, variant="rows"), ref_y, dtype),
        "spmm_dot": _error(sp.spmm(row_ptr, col, values, xt, N, variant="dot"), ref_y, dtype),
        "sddmm_dot": _error(sd.sddmm(row_ptr, col, dyt, xt), ref_dw, dtype),
    }
    del ref_y, ref_dw
    out["check"] = check
    if not all(c["ok"] for c in check.values()):
        out["error"] = "a kernel disagrees with float64; not timed"
        return out

    # the pattern is valid by construction (bench_csr): no invariant check, no warning
    csr = torch.sparse_csr_tensor(row_ptr, col, values, (N, K), check_invariants=False)
    cus_spmm, cus_spmm_note = _try("torch CSR matmul (cuSPARSE SpMM)", lambda: lambda: csr @ xt)
    zeros = torch.zeros_like(values)
    mask_csr = torch.sparse_csr_tensor(row_ptr, col, zeros, (N, K), check_invariants=False)
    cus_sddmm, cus_sddmm_note = _try(
        "torch.sparse.sampled_addmm (cuSPARSE SDDMM)",
        lambda: lambda: torch.sparse.sampled_addmm(mask_csr, dyt, xt.t()),
    )
    spmm_t = {
        "dense": _ms(lambda: torch.matmul(w, xt)),
        "rows": _ms(lambda: sp.spmm(row_ptr, col, values, xt, N, variant="rows")),
        "dot": _ms(lambda: sp.spmm(row_ptr, col, values, xt, N, variant="dot")),
        "cusparse": None if cus_spmm is None else _ms(cus_spmm),
    }
    sddmm_t = {
        "dense": _ms(lambda: torch.matmul(dyt, xt.t())),
        "dot": _ms(lambda: sd.sddmm(row_ptr, col, dyt, xt)),
        "cusparse": None if cus_sddmm is None else _ms(cus_sddmm),
    }
    useful = 2.0 * nnz * M
    for name, t in (("spmm", spmm_t), ("sddmm", sddmm_t)):
        out[name] = {
            f"{k}_ms": None if v is None else round(v, 5) for k, v in t.items()
        } | {
            f"{k}_vs_dense": None if v is None else round(t["dense"] / v, 3)
            for k, v in t.items()
            if k != "dense"
        } | {
            f"{k}_useful_tflops": None if v is None else round(useful / v / 1e9, 2)
            for k, v in t.items()
            if k != "dense"
        }  # fmt: skip
    out["spmm"]["cusparse_note"] = cus_spmm_note
    out["sddmm"]["cusparse_note"] = cus_sddmm_note
    out["transpose_x_ms"] = round(_ms(lambda: x.t().contiguous()), 5)
    out["panel_select_ms"] = round(_ms(lambda: sp.panel_select(row_ptr, values)), 5)
    out["configs"] = {
        "spmm_rows": _best(sp._spmm_rows_kernel),
        "spmm_dot": _best(sp._spmm_dot_kernel),
        "sddmm_dot": _best(sd._sddmm_dot_kernel),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="the target shape at d = 0.05/0.02/0.1")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device (CPU: fp32)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    args = ap.parse_args()
    if not (torch.cuda.is_available() or args.smoke):
        raise SystemExit("bench_sparse_train_gpu needs a CUDA GPU (or --smoke)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # MKL's CSR product (the CPU stand-in for cuSPARSE in --smoke) takes fp32 only
    dtype = getattr(torch, args.dtype) if device == "cuda" else torch.float32
    cases = SMOKE if args.smoke else QUICK if args.quick else FULL
    print(
        f"{'M':>6} {'N':>5} {'K':>5} {'d':>5} | spmm dense ms | x dense: rows   dot cusparse |"
        f" sddmm dense ms | x dense: dot cusparse"
    )
    results = []
    for M, N, K, d in cases:
        try:
            r = bench_case(M, N, K, d, dtype, device)
        except Exception as e:  # noqa: BLE001 - record and go on with the sweep
            results.append({"M": M, "N": N, "K": K, "density": d, "error": repr(e)})
            print(f"{M:>6} {N:>5} {K:>5} {d:>5.2f} | ERROR {e!r}"[:200], flush=True)
            continue
        results.append(r)
        if "error" in r:
            print(f"{M:>6} {N:>5} {K:>5} {d:>5.2f} | {r['error']}: {r['check']}", flush=True)
            continue
        s, q = r["spmm"], r["sddmm"]

        def f(v):
            return "n/a" if v is None else f"{v:.2f}"

        spmm_x = (
            f"{f(s['rows_vs_dense']):>13} {f(s['dot_vs_dense']):>5} {f(s['cusparse_vs_dense']):>8}"
        )
        sddmm_x = f"{f(q['dot_vs_dense']):>12} {f(q['cusparse_vs_dense']):>8}"
        print(
            f"{M:>6} {N:>5} {K:>5} {d:>5.2f} | {s['dense_ms']:>13.4f} | {spmm_x} |"
            f" {q['dense_ms']:>14.4f} | {sddmm_x}",
            flush=True,
        )
    stem = "sparse_train_gpu_smoke" if args.smoke else "sparse_train_gpu"
    stem += "_quick" if args.quick else ""
    name = args.dtype if device == "cuda" else "float32"
    path = write_results(args.out, stem, name, results)
    print(f"wrote {path}")
    if any("error" in r for r in results):
        raise SystemExit("some cases failed (see the JSON)")


if __name__ == "__main__":
    main()
