"""Inference export benchmark: ``to_inference`` layers and models against the dense layer with the
same weights and against torch's own sparse formats on the same weights, interleaved in one
process, medians of per-repeat ratios (speedup = dense time / format time).

    python benchmarks/bench_inference.py                 # CPU targets + LeNets, ~4 min, 2 threads
    python benchmarks/bench_inference.py --crossover     # CPU: CSR vs dense over densities
    python3 benchmarks/bench_inference.py --gpu          # GPU: kernel vs cuBLAS vs cuSPARSE
    python benchmarks/bench_inference.py --gpu --smoke   # the GPU script as a CPU dry run

CPU targets (the issue, one run): 9216->4096 at 10% kept >= 2.5x dense at batch 1, >= 2x at 64;
4096->4096 at 4% >= 8x at batch 1, >= 3.5x at 64; 90% kept >= 0.98x (dense kept); never below
torch's own CSR / BSR on the same weights. Columns:

* ``export``: ``to_inference`` of the pruned layer (calibrated at batch 1 and 64; what it chose
  is printed);
* ``torch_csr``: ``torch.sparse.mm(W.to_sparse_csr(), x.T).T`` (what a user writes: int64
  indices); ``torch_csr32``: ``torch.addmm(b, W_csr(int32), x.T).T`` (torch's fastest CSR call);
  ``torch_bsr``: ``torch.sparse.mm(W.to_sparse_bsr(32x32), x.T).T``.

The machine is shared: the 1-minute load average is recorded at the start and end of each case
(time only below ~0.8; ``--wait-load 0.8`` waits for that before each case). Nothing here
asserts a time. JSON: ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

LINEAR_TARGETS = [  # (name, in, out, kept fraction, {batch: target speedup})
    ("9216->4096 10%", 9216, 4096, 0.10, {1: 2.5, 64: 2.0}),
    ("4096->4096 4%", 4096, 4096, 0.04, {1: 8.0, 64: 3.5}),
    ("9216->4096 90%", 9216, 4096, 0.90, {1: 0.98, 64: 0.98}),
]
CONV_CASES = [  # (name, C_in, C_out, k, H, kept fraction, batches)
    ("LeNet-5 conv2 20->50 5x5 12x12", 20, 50, 5, 12, 0.12, (1, 64)),
    ("VGG conv5 512->512 3x3 14x14", 512, 512, 3, 14, 0.10, (1, 8)),
]
CROSSOVER_DENSITIES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7)
GPU_SHAPES = [("AlexNet fc6 9216->4096", 9216, 4096), ("AlexNet fc7 4096->4096", 4096, 4096),
              ("AlexNet fc8 4096->1000", 4096, 1000)]  # fmt: skip
GPU_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def load1() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


WAIT_LOAD: float | None = None  # --wait-load: before each case, wait for a quieter machine


def wait_quiet(max_s: float = 900.0) -> None:
    """With ``--wait-load X``: sleep until the 1-minute load average is below X (at most
    ``max_s``), so that a case is not timed while other jobs hold the cores."""
    if WAIT_LOAD is None or load1() is None:
        return
    t0 = time.time()
    while load1() >= WAIT_LOAD and time.time() - t0 < max_s:
        time.sleep(15)


def _commit() -> str | None:
    try:
        root = os.path.join(os.path.dirname(__file__), "..")
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or None  # fmt: skip
    except OSError:
        return None


def _pruned_linear(fin: int, fout: int, density: float, dtype=torch.float32, device="cpu"):
    from sparsekern import SparseLinear, set_mask

    torch.manual_seed(0)
    layer = SparseLinear(fin, fout).to(device, dtype)
    set_mask(layer, torch.rand(fout, fin, device=device) < density)
    return layer.eval()


def _torch_formats(layer: nn.Linear) -> dict:
    """torch's own sparse products on the same weights (no sparsekern code)."""
    w = (layer.weight * layer.mask).detach()
    b = layer.bias.detach()
    csr = w.to_sparse_csr()
    csr32 = torch.sparse_csr_tensor(
        csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape
    )
    pad_r, pad_c = (-w.shape[0]) % 32, (-w.shape[1]) % 32
    bsr = F.pad(w, (0, pad_c, 0, pad_r)).to_sparse_bsr((32, 32))
    bcol = b[:, None]

    def torch_bsr(x):
        xp = F.pad(x, (0, pad_c)) if pad_c else x
        return torch.sparse.mm(bsr, xp.t())[: w.shape[0]].t() + b

    return {
        "torch_csr": lambda x: torch.sparse.mm(csr, x.t()).t() + b,
        "torch_csr32": lambda x: torch.addmm(bcol, csr32, x.t()).t(),
        "torch_bsr": torch_bsr,
    }


def _time_row(fns: dict, device, repeats: int, budget_s: float) -> dict:
    from sparsekern.nn.inference import interleaved_times

    res = interleaved_times(fns, repeats=repeats, budget_s=budget_s, device=device)
    return {n: {"ms": round(t * 1e3, 4), "speedup": round(r, 3)} for n, (t, r) in res.items()}


def cpu_targets(quick: bool) -> list[dict]:
    from sparsekern.nn import to_inference

    rows = []
    repeats, budget = (9, 3.0) if quick else (21, 8.0)
    for name, fin, fout, d, targets in LINEAR_TARGETS:
        layer = _pruned_linear(fin, fout, d)
        dense = to_inference(layer, "dense")
        wait_quiet()
        t0 = time.perf_counter()
        export = to_inference(layer, batch_sizes=tuple(targets))
        export_s = time.perf_counter() - t0
        choice = export.inference_choice
        others = _torch_formats(layer)
        for b, target in targets.items():
            x = torch.randn(b, fin)
            wait_quiet()
            fns = {"dense": partial(dense, x), "export": partial(export, x)}
            fns |= {k: partial(f, x) for k, f in others.items()}
            before = load1()
            with torch.no_grad():
                torch.testing.assert_close(export(x), dense(x), rtol=1e-4, atol=1e-4)
                res = _time_row(fns, torch.device("cpu"), repeats, budget)
            row = {
                "group": "linear", "case": name, "batch": b, "target": target,
                "chosen": choice.format, "dense_above": choice.dense_above,
                "export_s": round(export_s, 2), "reason": choice.reason,
                "load_before": before, "load_after": load1(), **res,
            }  # fmt: skip
            best_torch = max(res[k]["speedup"] for k in others)
            verdict = "meets" if res["export"]["speedup"] >= target else "MISSES"
            print(
                f"{name:16s} B={b:<3d} dense {res['dense']['ms']:9.3f} ms | export "
                f"{res['export']['speedup']:5.2f}x ({choice.format}) target {target}x {verdict}"
                f" | torch csr {res['torch_csr']['speedup']:.2f}x csr32 "
                f"{res['torch_csr32']['speedup']:.2f}x bsr {res['torch_bsr']['speedup']:.2f}x "
                f"(best torch {best_torch:.2f}x) | load {before:.2f}->{row['load_after']:.2f}",
                flush=True,
            )
            rows.append(row)
    return rows


def cpu_convs(quick: bool) -> list[dict]:
    from sparsekern import SparseConv2d, set_mask
    from sparsekern.nn import to_inference

    rows = []
    repeats, budget = (7, 2.0) if quick else (15, 5.0)
    for name, cin, cout, k, hw, d, batches in CONV_CASES:
        torch.manual_seed(0)
        conv = SparseConv2d(cin, cout, k, padding=k // 2 if hw > 12 else 0)
        set_mask(conv, torch.rand(conv.weight.shape) < d)
        conv.eval()
        x1 = torch.randn(1, cin, hw, hw)
        wait_quiet()
        dense = to_inference(conv, "dense")
        csr = to_inference(conv, "csr")
        export = to_inference(conv, example_input=x1, batch_sizes=batches)
        for b in batches:
            x = torch.randn(b, cin, hw, hw)
            wait_quiet()
            fns = {"dense": partial(dense, x), "export": partial(export, x), "csr": partial(csr, x)}
            before = load1()
            with torch.no_grad():
                res = _time_row(fns, torch.device("cpu"), repeats, budget)
            choice = export.inference_choice
            row = {"group": "conv", "case": name, "batch": b, "chosen": choice.format,
                   "reason": choice.reason, "load_before": before, "load_after": load1(),
                   **res}  # fmt: skip
            print(
                f"{name:32s} B={b:<3d} dense {res['dense']['ms']:9.3f} ms | export "
                f"{res['export']['speedup']:5.2f}x ({row['chosen']}) | csr (unfold) "
                f"{res['csr']['speedup']:5.2f}x | load {before:.2f}->{row['load_after']:.2f}",
                flush=True,
            )
            rows.append(row)
    return rows


def cpu_lenets(quick: bool) -> list[dict]:
    from models import build_model
    from sparsekern import load_compressed
    from sparsekern.nn import inference_report
    from sparsekern.nn.inference import format_report

    rows = []
    root = os.path.join(os.path.dirname(__file__), "..", "results")
    for name in ("lenet300", "lenet5"):
        path = os.path.join(root, name, f"{name}_pruned.skr")
        if not os.path.exists(path):
            print(f"{name}: {path} missing, skipped")
            continue
        model = load_compressed(path, build_model(name)).eval()
        wait_quiet()
        rep = inference_report(
            model, torch.randn(1, 1, 28, 28), batch_sizes=(1, 64),
            repeats=11 if quick else 31, budget_s=2.0 if quick else 6.0,
        )  # fmt: skip
        print(f"{name} ({path}):\n{format_report(rep)}", flush=True)
        rows.append({"group": "model", "case": name, **rep})
    return rows


def cpu_crossover(quick: bool) -> list[dict]:
    """CSR (the export's CPU path) against dense over kept fractions: where the static rule's
    thresholds come from."""
    from sparsekern.nn import to_inference

    rows = []
    repeats, budget = (7, 1.5) if quick else (11, 3.0)
    for fin, fout in ((4096, 4096), (784, 300)):
        for d in CROSSOVER_DENSITIES:
            layer = _pruned_linear(fin, fout, d)
            dense, csr = to_inference(layer, "dense"), to_inference(layer, "csr")
            for b in (1, 64):
                x = torch.randn(b, fin)
                wait_quiet()
                with torch.no_grad():
                    fns = {"dense": partial(dense, x), "csr": partial(csr, x)}
                    res = _time_row(fns, torch.device("cpu"), repeats, budget)
                rows.append({"group": "crossover", "case": f"{fin}->{fout}", "density": d,
                             "batch": b, "load": load1(), **res})  # fmt: skip
                print(f"{fin}->{fout} kept {d:4.2f} B={b:<3d} csr {res['csr']['speedup']:5.2f}x "
                      f"dense ({res['dense']['ms']:.3f} ms) load {load1():.2f}",
                      flush=True)  # fmt: skip
    return rows


def gpu(smoke: bool) -> list[dict]:
    """bf16, 10% kept: the decode kernel against cuBLAS (F.linear on the masked weight) and
    cuSPARSE (torch CSR), CUDA-synchronised interleaved timing."""
    from sparsekern.formats.csr import CSRMatrix
    from sparsekern.ops.csr_linear import KERNEL_MAX_ROWS, csr_linear_launch, torch_csr

    dev = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = GPU_SHAPES if not smoke else [("smoke 96->64", 96, 64)]
    batches = GPU_BATCHES if not smoke else (1, 8)
    rows = []
    for name, fin, fout in shapes:
        torch.manual_seed(0)
        keep = torch.rand(fout, fin, device=dev) < 0.1
        w = torch.randn(fout, fin, device=dev, dtype=dtype) * keep
        b = torch.randn(fout, device=dev, dtype=dtype)
        m = CSRMatrix.from_dense(w, mask=keep)
        sp = torch_csr(m.values, m.row_ptr, m.col_idx, fout, fin)
        for bs in batches:
            x = torch.randn(bs, fin, device=dev, dtype=dtype)
            fns = {"cublas": partial(F.linear, x, w, b),
                   "cusparse": partial(torch.addmm, b[:, None], sp, x.t())}  # fmt: skip
            if bs <= KERNEL_MAX_ROWS:
                fns["kernel"] = partial(
                    csr_linear_launch, x, m.values, m.row_ptr, m.col_idx, b, fout, fin
                )
                y = csr_linear_launch(x, m.values, m.row_ptr, m.col_idx, b, fout, fin)
                ref = F.linear(x.float(), w.float(), b.float())
                torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * 30)
            res = _time_row(fns, dev, 5 if smoke else 50, 0.5 if smoke else 3.0)
            # bytes the kernel must move: values + int16 indices + row_ptr + x + y
            kbytes = m.nnz * (w.element_size() + 2) + 4 * (fout + 1) + (bs * (fin + fout)) * 2
            row = {"group": "gpu", "case": name, "batch": bs, "dtype": str(dtype),
                   "nnz": m.nnz, "kernel_bytes": kbytes, **res}  # fmt: skip
            if "kernel" in res:
                row["kernel_tb_per_s"] = round(kbytes / (res["kernel"]["ms"] * 1e-3) / 1e12, 3)
            print(f"{name:24s} B={bs:<3d} cuBLAS {res['cublas']['ms']:.4f} ms | "
                  + " ".join(f"{k} {v['speedup']:.2f}x" for k, v in res.items() if k != "cublas"),
                  flush=True)  # fmt: skip
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--only", choices=["linear", "conv", "lenet"], help="one CPU group")
    ap.add_argument("--crossover", action="store_true", help="CSR vs dense over densities (CPU)")
    ap.add_argument("--gpu", action="store_true", help="the GPU benchmark")
    ap.add_argument("--smoke", action="store_true", help="with --gpu: a CPU dry run (interpreter)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wait-load", type=float, help="wait for a 1-min load average below this")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    global WAIT_LOAD
    WAIT_LOAD = args.wait_load
    if args.gpu and args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not args.gpu:
        os.environ["TRITON_INTERPRET"] = "0"  # time the CPU path, not the interpreter
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, load {load1()}")
    if args.gpu:
        rows, stem = gpu(args.smoke), "inference_gpu" + ("_smoke" if args.smoke else "")
    elif args.crossover:
        rows, stem = cpu_crossover(args.quick), "inference_crossover"
    else:
        groups = {"linear": cpu_targets, "conv": cpu_convs, "lenet": cpu_lenets}
        rows = []
        for g, fn in groups.items():
            if args.only in (None, g):
                rows += fn(args.quick)
        stem = "inference_cpu"
    env = {
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": _commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{stem}_{env['date'][:10]}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
