"""CPU benchmark of structured pruning: torchvision nets (random init, eval mode) against the
same net with 25 / 50 / 75% of each group's channels removed by ``prune_channels`` (L1).

    nice python benchmarks/bench_cpu_structured.py                  # ~10 min, 2 threads
    nice python benchmarks/bench_cpu_structured.py --smoke          # tiny, seconds

Per net: parameters and MACs (conv + linear multiply-accumulates at 1x3xRxR) for all amounts;
for the timed nets, latency at each batch size, dense and the three pruned nets timed
interleaved in one process (order rotated every repeat), medians of per-repeat ratios
(speedup = dense time / pruned time), throughput = batch / median time. The machine is shared:
before each timed case the script waits for the 1-minute load average to drop below
--wait-load (--max-wait s in all, over the whole run), then runs anyway; the load at the start
and end of each case is recorded.
Targets (the issue): at 50%, params <= 0.35x and CPU >= 2x faster at batch 4-32. JSON and a
markdown table: results/structured/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _common import cpu_environment, time_interleaved, write_json  # noqa: E402

from sparsekern.pruning.structured import count_macs, count_params, prune_channels  # noqa: E402

TIMED = ["resnet18", "mobilenet_v2", "vgg16_bn"]
COUNTED = ["resnet18", "resnet50", "mobilenet_v2", "vgg16_bn", "alexnet"]
AMOUNTS = [0.25, 0.5, 0.75]


def load() -> float:
    return os.getloadavg()[0]


def wait_quiet(limit: float, deadline: float) -> float:
    """Sleep until the 1-min load is below ``limit`` or the clock passes ``deadline`` (one
    waiting budget for the whole run, not per case); the seconds waited."""
    t0 = time.time()
    while load() >= limit and time.time() < deadline:
        time.sleep(10)
    return round(time.time() - t0, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", type=int, default=128, help="input 3 x res x res")
    ap.add_argument("--batches", default="4,32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wait-load", type=float, default=0.8)
    ap.add_argument("--max-wait", type=float, default=600)
    ap.add_argument("--nets", help="comma-separated subset of the nets (default: all)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results" / "structured"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.res, args.batches, args.repeats, args.max_wait = 32, "2", 2, 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    deadline = time.time() + args.max_wait
    env = cpu_environment()
    env["command"] = "python " + " ".join(sys.argv)
    rows = []
    names = TIMED if args.smoke else COUNTED
    if args.nets:
        names = [n for n in names if n in args.nets.split(",")]
    for name in names:
        dense = getattr(torchvision.models, name)(weights=None).eval()
        x1 = torch.randn(1, 3, args.res, args.res)
        nets = {"dense": dense}
        for a in AMOUNTS:
            nets[f"p{int(a * 100)}"] = prune_channels(dense, (x1,), a, "l1").eval()
        row = {"net": name, "res": args.res, "counts": {}, "timing": {}}
        p0, m0 = count_params(dense), count_macs(dense, x1)
        for k, m in nets.items():
            with torch.no_grad():
                assert m(x1).shape == dense(x1).shape
            p, mac = count_params(m), count_macs(m, x1)
            row["counts"][k] = {"params": p, "macs": mac, "params_x": p / p0, "macs_x": mac / m0}
        if name in TIMED:
            for b in batches:
                waited = wait_quiet(args.wait_load, deadline)
                x = torch.randn(b, 3, args.res, args.res)
                fns = {k: (lambda m=m, x=x: m(x)) for k, m in nets.items()}
                start = load()
                with torch.inference_mode():
                    res = time_interleaved(fns, args.repeats, warmup=1, base="dense")
                for k in res:
                    res[k]["speedup"] = round(1 / res[k]["ratio_median"], 3)
                    res[k]["images_per_s"] = round(b / (res[k]["median_ms"] / 1e3), 2)
                row["timing"][str(b)] = {
                    "results": res,
                    "load_start": start,
                    "load_end": load(),
                    "waited_s": waited,
                }
                print(
                    name, b, {k: v["speedup"] for k, v in res.items()}, f"load {start}", flush=True
                )
        rows.append(row)
        print(name, {k: round(v["params_x"], 3) for k, v in row["counts"].items()}, flush=True)
    payload = {"env": env, "args": vars(args), "amounts": AMOUNTS, "rows": rows}
    stem = "bench_cpu_structured" + ("_smoke" if args.smoke else "")
    if args.nets:
        stem += "_" + args.nets.replace(",", "_")
    path = write_json(os.path.join(args.out, stem + ".json"), payload)
    Path(args.out, stem + ".md").write_text(table(payload))
    print("wrote", path)


def table(payload) -> str:
    env, a = payload["env"], payload["args"]
    lines = [
        f"# Structured pruning on CPU (torchvision, random init, L1, input 3x{a['res']}x{a['res']})"
        f"\n\n`{env['command']}` at `{env['commit']}`, {env['date']}, {a['threads']} threads, "
        f"{env['cpus']} CPUs (shared). Speedup = median over {a['repeats']} interleaved repeats "
        "of dense time / pruned time.\n",
        "| net | removed | params | params x | MACs | MACs x | "
        + " | ".join(f"speedup b{b} | img/s b{b} | load b{b}" for b in a["batches"].split(","))
        + " |",
        "|---|---|---|---|---|---|" + "---|---|---|" * len(a["batches"].split(",")),
    ]
    for row in payload["rows"]:
        for k, c in row["counts"].items():
            cells = [
                row["net"], k, f"{c['params']:,}", f"{c['params_x']:.3f}", f"{c['macs']:,}",
                f"{c['macs_x']:.3f}",
            ]  # fmt: skip
            for b in a["batches"].split(","):
                t = row["timing"].get(b)
                if t is None:
                    cells += ["-", "-", "-"]
                else:
                    r = t["results"][k]
                    cells += [
                        f"{r['speedup']:.2f}x",
                        f"{r['images_per_s']:.1f}",
                        f"{t['load_start']:.2f}",
                    ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
