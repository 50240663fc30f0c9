"""GPU benchmark of masked_conv2d against cuDNN dense and torch's unfused masking.

    PYTHONPATH=. python3 benchmarks/bench_conv.py                  # AlexNet + VGG-16, batch 64, 256
    PYTHONPATH=. python3 benchmarks/bench_conv.py --quick          # two layers, batch 64
    PYTHONPATH=. python3 benchmarks/bench_conv.py --batch 64 --model vgg16 --out benchmarks/results
    PYTHONPATH=. python3 benchmarks/bench_conv.py --smoke          # tiny shapes, any device (CPU:
                                                                   # the interpreter), no JSON

For each conv layer shape of torchvision's AlexNet and VGG-16 (224x224 inputs), batch and density
it times, with triton.testing.do_bench (median of repeats, L2 flushed between runs), forward and
forward+backward of
  dense     F.conv2d(x, W, b)                          (cuDNN; density ignored, timed once)
  unfused   F.conv2d(x, W*M, b), dW masked by autograd  (what torch.nn.utils.prune's hook does)
  module    masked_conv2d(x, W, M, b, assume_pruned_zero=True), W zero at pruned entries: what
            SparseConv2d runs (cuDNN forward, dX and dW, plus the mask pass on dW; target:
            fwd+bwd <= 1.03x cuDNN)
  block64   block_masked_conv2d(x, W, B, b)            (the same fraction of 64x64 tap-major blocks
            kept, the rest skipped: SparseConv2d's block mode; target at d=0.1: >= 4x cuDNN)
and the peak memory of one forward+backward. Layers with 3 input channels (the image) compute no
dx, as in training. Prints times and ratios to dense; writes JSON (GPU name, torch and triton
versions, date, every number) under --out.

Variants are data (VARIANTS below).
"""

from __future__ import annotations

import argparse
import importlib
import os
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

from sparsekern.ops import masked_conv2d  # noqa: E402
from sparsekern.ops.block_sparse_conv2d import (  # noqa: E402
    block_masked_conv2d,
    conv_block_occupancy,
)
from sparsekern.pruning.block import expand_block_mask  # noqa: E402

_bsc = importlib.import_module("sparsekern.ops.block_sparse_conv2d.kernels")

# (name, C_in, C_out, H = W of the input, kernel, stride, padding, how many such layers)
LAYERS = {
    "alexnet": [
        ("conv1", 3, 64, 224, 11, 4, 2, 1),
        ("conv2", 64, 192, 27, 5, 1, 2, 1),
        ("conv3", 192, 384, 13, 3, 1, 1, 1),
        ("conv4", 384, 256, 13, 3, 1, 1, 1),
        ("conv5", 256, 256, 13, 3, 1, 1, 1),
    ],
    "vgg16": [
        ("conv1_1", 3, 64, 224, 3, 1, 1, 1),
        ("conv1_2", 64, 64, 224, 3, 1, 1, 1),
        ("conv2_1", 64, 128, 112, 3, 1, 1, 1),
        ("conv2_2", 128, 128, 112, 3, 1, 1, 1),
        ("conv3_1", 128, 256, 56, 3, 1, 1, 1),
        ("conv3_2", 256, 256, 56, 3, 1, 1, 2),  # conv3_2, conv3_3
        ("conv4_1", 256, 512, 28, 3, 1, 1, 1),
        ("conv4_2", 512, 512, 28, 3, 1, 1, 2),  # conv4_2, conv4_3
        ("conv5_1", 512, 512, 14, 3, 1, 1, 3),  # conv5_1..5_3
    ],
}
QUICK = {"alexnet": ["conv2"], "vgg16": ["conv3_2"]}
SMOKE_LAYERS = [("smoke_3x3", 5, 7, 9, 3, 1, 1, 1), ("smoke_11x11_s4", 3, 4, 19, 11, 4, 2, 1)]
BATCHES = [64, 256]
DENSITIES = [1.0, 0.35, 0.1]


def _dense(x, w, mask, b, conv):
    return lambda: F.conv2d(x, w, b, **conv)


def _unfused(x, w, mask, b, conv):
    return lambda: F.conv2d(x, w * mask, b, **conv)


def _module(x, w, mask, b, conv):
    with torch.no_grad():
        wz = w.detach().masked_fill(~mask, 0)  # the mask invariant, on a copy
    wz.requires_grad_(w.requires_grad)
    return lambda: masked_conv2d(x, wz, mask, b, **conv, assume_pruned_zero=True)


BLOCK = (64, 64)


def _block_sparse(x, w, mask, b, conv):
    """SparseConv2d's block mode at the mask's density: that fraction of the 64x64 blocks of the
    tap-major weight view is kept (at random), the kernels skip the rest."""
    occ_shape = conv_block_occupancy(torch.ones_like(mask), BLOCK).shape
    g = torch.Generator(device=mask.device).manual_seed(1)
    occ = torch.rand(occ_shape, device=mask.device, generator=g) < mask.float().mean()
    if not occ.any():
        occ.view(-1)[0] = True
    bmask = expand_block_mask(occ, tuple(w.shape), BLOCK)
    with torch.no_grad():
        w.mul_(bmask)  # the mask invariant: pruned weights are zero
    return lambda: block_masked_conv2d(x, w, bmask, b, block_size=BLOCK, **conv)


# name -> (factory(x, weight, mask, bias, conv kwargs) -> zero-argument forward, uses the mask).
# A variant that ignores the mask is timed once per shape, at density 1.0.
VARIANTS = {
    "dense": (_dense, False),
    "unfused": (_unfused, True),
    "module": (_module, True),
    # Last: it zeroes w outside its blocks in place (values do not change any timing).
    "block64": (_block_sparse, True),
}


def _time(fn, *, grad_to_none, smoke: bool) -> float:
    """Median milliseconds of ``fn`` over repeats (--smoke: one timed call, any device)."""
    if smoke:
        fn()  # warm-up (compilation / interpreter set-up)
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def _peak_mib(fn) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _chosen_configs() -> dict:
    """The autotuner's choice for the block kernels' last launch (for tuning the config lists)."""
    names = ("_bsc_fwd_kernel", "_bsc_dx_kernel", "_bsc_dw_kernel")
    return {n: str(getattr(getattr(_bsc, n), "best_config", None)) for n in names}


def _flops(batch: int, layer, with_dx: bool) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of the dense conv: 2 per multiply-add per GEMM."""
    _, c_in, c_out, hw, k, s, p, _ = layer
    out = (hw + 2 * p - k) // s + 1
    fwd = 2.0 * batch * out * out * c_out * c_in * k * k
    return fwd, fwd * (3 if with_dx else 2)


def bench_layer(model: str, layer, batch: int, dtype, device, smoke: bool) -> list[dict]:
    name, c_in, c_out, hw, k, s, p, count = layer
    conv = dict(stride=s, padding=p)
    with_dx = c_in != 3  # the image needs no gradient
    x = torch.randn(batch, c_in, hw, hw, device=device, dtype=dtype, requires_grad=with_dx)
    w = torch.randn(c_out, c_in, k, k, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(c_out, device=device, dtype=dtype, requires_grad=True)
    params = [t for t in (x, w, b) if t.requires_grad]
    fwd_flops, all_flops = _flops(batch, layer, with_dx)
    rows = []
    for density in DENSITIES:
        g = torch.Generator(device=device).manual_seed(0)
        mask = torch.rand(w.shape, device=device, generator=g) < density
        for vname, (factory, uses_mask) in VARIANTS.items():
            if not uses_mask and density != DENSITIES[0]:
                continue
            f = factory(x, w, mask, b, conv)
            with torch.no_grad():
                t_fwd = _time(f, grad_to_none=None, smoke=smoke)
            y = f()
            dy = torch.randn_like(y)
            del y

            def fwd_bwd(f=f, dy=dy):
                f().backward(dy)

            t_all = _time(fwd_bwd, grad_to_none=params, smoke=smoke)
            for t in params:
                t.grad = None
            peak = _peak_mib(fwd_bwd)
            for t in params:
                t.grad = None
            rows.append(
                {
                    "model": model,
                    "layer": name,
                    "count": count,
                    "batch": batch,
                    "C_in": c_in,
                    "C_out": c_out,
                    "HW": hw,
                    "kernel": k,
                    "stride": s,
                    "padding": p,
                    "with_dx": with_dx,
                    "density": density if uses_mask else 1.0,
                    "variant": vname,
                    "fwd_ms": t_fwd,
                    "fwd_bwd_ms": t_all,
                    "peak_mib": peak,
                    "fwd_tflops": fwd_flops / t_fwd / 1e9,
                    "fwd_bwd_tflops": all_flops / t_all / 1e9,
                    "configs": _chosen_configs() if vname == "block64" else None,
                }
            )
    dense = next(r for r in rows if r["variant"] == "dense")
    for r in rows:
        r["fwd_vs_dense"] = r["fwd_ms"] / dense["fwd_ms"]
        r["fwd_bwd_vs_dense"] = r["fwd_bwd_ms"] / dense["fwd_bwd_ms"]
        # throughput relative to cuDNN dense
        r["fwd_bwd_throughput_vs_dense"] = dense["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


def _print_row(r: dict) -> None:
    print(
        f"{r['model']:>8} {r['layer']:>14} {r['batch']:>5} {r['density']:>5.2f} {r['variant']:>8}"
        f" | {r['fwd_ms']:>9.3f} {r['fwd_bwd_ms']:>9.3f} | {r['fwd_vs_dense']:>6.2f}"
        f" {r['fwd_bwd_vs_dense']:>6.2f} | {r['fwd_bwd_tflops']:>7.1f}",
        flush=True,
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--model", choices=sorted(LAYERS), action="append", help="default: all")
    ap.add_argument("--batch", type=int, action="append", help=f"default: {BATCHES}")
    ap.add_argument("--quick", action="store_true", help=f"layers {QUICK}, batch 64")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device, no JSON")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(
            "bench_conv needs a CUDA GPU (or --smoke for a run through the interpreter)"
        )
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        plan = [("smoke", layer, batch) for layer in SMOKE_LAYERS for batch in (2,)]
    else:
        models = args.model or sorted(LAYERS)
        batches = args.batch or ([64] if args.quick else BATCHES)
        plan = [
            (m, layer, batch)
            for batch in batches
            for m in models
            for layer in LAYERS[m]
            if not args.quick or layer[0] in QUICK[m]
        ]
    print(
        f"{'model':>8} {'layer':>14} {'batch':>5} {'dens':>5} {'variant':>8} | {'fwd ms':>9}"
        f" {'f+b ms':>9} | {'fwd/d':>6} {'f+b/d':>6} | {'TFLOP/s':>7} (f+b, dense FLOPs)"
    )
    rows = []
    for model, layer, batch in plan:
        for r in bench_layer(model, layer, batch, dtype, device, args.smoke):
            rows.append(r)
            _print_row(r)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.smoke:
        print("smoke run: no JSON written")
        return
    path = write_results(args.out, "conv_quick" if args.quick else "conv", args.dtype, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
