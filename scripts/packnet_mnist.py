"""PackNet on permuted MNIST (Mallya and Lazebnik 2018, small scale): 4 tasks (task 0: MNIST, tasks
1-3: fixed random pixel permutations) in one LeNet-300-100 trunk (784-300-100, per-task 100->10
heads), against fine-tuning the trunk in sequence (forgetting) and one network per task with the
same total trunk size (hidden sizes scaled so the 4 trunks together hold the one trunk's weights).

    python scripts/packnet_mnist.py                  # preset "full": ~1 CPU-minute
    python scripts/packnet_mnist.py --preset ci      # seconds

Writes results/packnet/summary.json and results/packnet/README.md.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts._lib.small_runs import parse_run_args, run_header, save_run  # noqa: E402
from sparsekern.formats._files import atomic_write  # noqa: E402
from sparsekern.nn import sparsify  # noqa: E402
from sparsekern.pruning import PackNet  # noqa: E402
from sparsekern.training.data import load_mnist  # noqa: E402

PRESETS = {
    "full": {"tasks": 4, "train": 4000, "epochs": 2, "retrain": 1, "batch": 64, "lr": 0.05},
    "ci": {"tasks": 4, "train": 500, "epochs": 1, "retrain": 1, "batch": 64, "lr": 0.05},
}
# Mallya and Lazebnik 2018, Table 1 (VGG-16; ImageNet -> CUBS -> Stanford Cars -> Flowers):
# top-1 error, %
PAPER = {
    "tasks": ["ImageNet", "CUBS", "Cars", "Flowers"],
    "packnet_err": [29.19, 22.56, 17.09, 11.07],
    "lwf_err": [36.58, 34.24, 22.07, 12.15],
}


def trunk(h1: int = 300, h2: int = 100) -> nn.Module:
    return sparsify(nn.Sequential(nn.Flatten(), nn.Linear(784, h1), nn.ReLU(),
                                  nn.Linear(h1, h2), nn.ReLU()))  # fmt: skip


def make_tasks(data: dict, n_tasks: int, n_train: int, seed: int = 0) -> list[dict]:
    """Task t: every image's 784 pixels in a fixed permutation (identity for t = 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n_tasks):
        perm = torch.arange(784) if t == 0 else torch.randperm(784, generator=g)
        idx = torch.randperm(data["x_train"].shape[0], generator=g)[:n_train]
        out.append({
            "x_train": data["x_train"][idx].flatten(1)[:, perm], "y_train": data["y_train"][idx],
            "x_test": data["x_test"].flatten(1)[:, perm], "y_test": data["y_test"],
        })  # fmt: skip
    return out


def train(body, head, task, epochs, cfg, step=None, seed=0):
    params = [p for p in list(body.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9)
    if step is not None:
        step.set_optimizer(opt)
    g = torch.Generator().manual_seed(seed)
    body.train()
    x, y = task["x_train"], task["y_train"]
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], cfg["batch"]):
            b = order[i : i + cfg["batch"]]
            loss = F.cross_entropy(head(body(x[b])), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step is not None:
                step.step()


@torch.no_grad()
def accuracy(body, head, task) -> float:
    body.eval()
    pred = torch.cat([head(body(x)).argmax(1) for x in task["x_test"].split(2000)])
    return float((pred == task["y_test"]).float().mean())


def run_packnet(tasks, cfg) -> dict:
    torch.manual_seed(0)
    body, heads = trunk(), nn.ModuleList(nn.Linear(100, 10) for _ in tasks)
    pn = PackNet(body, None, num_tasks=len(tasks))
    for t, task in enumerate(tasks):
        pn.start_task()
        train(body, heads[t], task, cfg["epochs"], cfg, pn, seed=t)
        pn.prune()
        train(body, heads[t], task, cfg["retrain"], cfg, pn, seed=100 + t)
    acc = []
    for t, task in enumerate(tasks):
        with pn.task(t):
            acc.append(accuracy(body, heads[t], task))
    return {"acc": acc, "owned": {str(k): v for k, v in pn.task_sparsity().items()}}


def run_finetune(tasks, cfg) -> dict:
    torch.manual_seed(0)
    body, heads = trunk(), nn.ModuleList(nn.Linear(100, 10) for _ in tasks)
    right_after = []
    for t, task in enumerate(tasks):
        train(body, heads[t], task, cfg["epochs"] + cfg["retrain"], cfg, seed=t)
        right_after.append(accuracy(body, heads[t], task))
    return {"acc": [accuracy(body, heads[t], task) for t, task in enumerate(tasks)],
            "acc_right_after": right_after}  # fmt: skip


def run_independent(tasks, cfg) -> dict:
    total = 784 * 300 + 300 * 100
    a = (-784 * 300 + math.sqrt((784 * 300) ** 2 + 4 * 300 * 100 * total / len(tasks))) / (
        2 * 300 * 100
    )  # 784*300a + 300*100a^2 = total / tasks
    h1, h2 = round(300 * a), round(100 * a)
    acc = []
    for t, task in enumerate(tasks):
        torch.manual_seed(t)
        body, head = trunk(h1, h2), nn.Linear(h2, 10)
        train(body, head, task, cfg["epochs"] + cfg["retrain"], cfg, seed=t)
        acc.append(accuracy(body, head, task))
    return {
        "acc": acc,
        "hidden": [h1, h2],
        "trunk_weights_total": len(tasks) * (784 * h1 + h1 * h2),
    }


def write_table(out: Path, summary: dict) -> None:
    r = summary["results"]
    rows = ["| task | PackNet | fine-tune in sequence | one net per task (same total size) |",
            "|---|---|---|---|"]  # fmt: skip
    for t in range(len(r["packnet"]["acc"])):
        rows.append(f"| {t} | {r['packnet']['acc'][t]:.4f} | {r['finetune']['acc'][t]:.4f} | "
                    f"{r['independent']['acc'][t]:.4f} |")  # fmt: skip
    p = PAPER
    paper = ["| paper (VGG-16, top-1 error %) | " + " | ".join(p["tasks"]) + " |",
             "|---|" + "---|" * len(p["tasks"]),
             "| PackNet | " + " | ".join(map(str, p["packnet_err"])) + " |",
             "| LwF | " + " | ".join(map(str, p["lwf_err"])) + " |"]  # fmt: skip
    text = "\n".join([
        "# PackNet on permuted MNIST (test accuracy after all 4 tasks)", "",
        *run_header(summary),
        "", *rows, "", "Paper, for comparison (other scale, other tasks):", "", *paper, "",
    ])  # fmt: skip
    atomic_write(out / "README.md", text.encode())


def main(argv=None) -> int:
    args = parse_run_args(__doc__, PRESETS, "packnet", argv)  # exit 2 before any work
    cfg = PRESETS[args.preset]
    torch.set_num_threads(1)
    t0 = time.time()
    tasks = make_tasks(load_mnist(args.data), cfg["tasks"], cfg["train"])
    results = {}
    for name, fn in (("packnet", run_packnet), ("finetune", run_finetune),
                     ("independent", run_independent)):  # fmt: skip
        results[name] = fn(tasks, cfg)
        print(name, [round(a, 4) for a in results[name]["acc"]], flush=True)
    save_run("packnet", argv, args, t0, write_table, config=cfg, results=results, paper=PAPER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
