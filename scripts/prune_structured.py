"""Structured pruning of LeNet-5 (with BatchNorm) on MNIST: test error vs kept FLOPs for L1,
Taylor, network slimming, random, and the from-scratch control ("Rethinking the value of network
pruning"). Channels and neurons are removed physically (sparsekern.pruning.structured).

    nice python scripts/prune_structured.py          # results/structured/ (~17 min, 1 thread)
    nice python scripts/prune_structured.py --quick   # smoke run (runs/structured-quick)

Protocol (one budget for all, recorded in the JSON):
- dense: LeNet-5 + BN after each conv, --dense-epochs of SGD (momentum 0.9, cosine LR from --lr);
  slimming trains its own dense net with --bn-l1 * sum|gamma| added to the loss (Liu et al.);
- each method and amount: StructuredPruner (BasePruner lifecycle) prunes in --rounds rounds up to
  the amount (the fraction of each group's channels / neurons removed: conv1, conv2, fc1; fc2 is
  the classifier and keeps its 10 outputs), --ft-epochs of fine-tuning after each round at
  --ft-lr, masked; then export() removes the channels for real and the small net is evaluated;
- Taylor (first order, Molchanov et al.) scores over --taylor-batches training batches;
- RLS (Yu et al. 2022; --methods rls): each consumer's P = R^{-1} by recursive least squares over
  the same --taylor-batches batches at each round, scores = the layer's least-squares refit
  error; the rounds are the fixed ones above (not the paper's "wait until recovered" gate);
- Hessian radius (--methods hessian): top Hessian eigenvector by power iteration over
  --hessian-batches batches, the neurons carrying most of it removed first; pruned from the same
  dense net as the others (the paper prunes while training from scratch);
- from scratch: the Taylor-pruned architecture, re-initialised, trained for dense + fine-tuning
  epochs with the dense schedule.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from sparsekern.nn import sparsify  # noqa: E402
from sparsekern.pruning.structured import (  # noqa: E402
    StructuredPruner,
    count_macs,
    count_params,
)
from sparsekern.training.data import load_mnist, tensor_loader  # noqa: E402

METHODS = {
    "l1": "l1",
    "taylor": "taylor",
    "slimming": "bn_scale",
    "random": "random",
    "rls": "rls",
    "hessian": "hessian_radius",
}
DEFAULT_METHODS = "l1,taylor,slimming,random,scratch"


class LeNet5BN(nn.Module):
    """Caffe's LeNet-5 with a BatchNorm after each conv (network slimming needs BN scales).
    ``[B, 1, 28, 28] -> [B, 10]``: conv1 20@5x5 -> BN -> pool -> conv2 50@5x5 -> BN -> pool ->
    flatten 800 -> fc1 500 -> ReLU -> fc2 10."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 20, 5), nn.BatchNorm2d(20)
        self.conv2, self.bn2 = nn.Conv2d(20, 50, 5), nn.BatchNorm2d(50)
        self.fc1, self.fc2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.bn1(self.conv1(x)), 2)  # [B, 20, 12, 12]
        x = F.max_pool2d(self.bn2(self.conv2(x)), 2)  # [B, 50, 4, 4]
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--amounts", default="0.5,0.7", help="channel fractions removed")
    a("--methods", default=DEFAULT_METHODS, help=f"any of {','.join(METHODS)},scratch")
    a("--dense-epochs", type=int, default=3)
    a("--ft-epochs", type=int, default=1, help="fine-tuning epochs after each round")
    a("--rounds", type=int, default=2)
    a("--lr", type=float, default=0.05)
    a("--ft-lr", type=float, default=0.01)
    a("--bn-l1", type=float, default=1e-4)
    a("--taylor-batches", type=int, default=20, help="calibration batches (Taylor, RLS)")
    a("--hessian-batches", type=int, default=4, help="batches of each Hessian-vector product")
    a("--batch-size", type=int, default=128)
    a("--subset", type=int, default=0, help="train on the first N images (0: all)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=1)
    a("--data", default=str(ROOT / "data" / "mnist"))
    a("--out", default=None)
    a("--quick", action="store_true")
    a("--torchvision", default="", help="instead: params / MACs of these torchvision nets "
      "(random init, L1) at --amounts, e.g. convnext_tiny,vit_b_16")  # fmt: skip
    a("--image-size", type=int, default=224)
    return p.parse_args(argv)


def torchvision_rows(args, out: Path) -> None:
    """Parameters and MACs of torchvision nets (no weights) pruned by L1 at each amount: what the
    channel graph can remove (ConvNeXt, ViT: the MLP hidden units only)."""
    import torchvision

    from sparsekern.pruning.structured import channel_groups, prune_channels

    commit, t0, rows = git_commit(), time.time(), []
    x = torch.randn(1, 3, args.image_size, args.image_size)
    for name in args.torchvision.split(","):
        torch.manual_seed(args.seed)
        net = getattr(torchvision.models, name)().eval()
        groups = channel_groups(net, x)
        base = {"params": count_params(net), "macs": count_macs(net, x)}
        rows.append(
            {
                "net": name,
                "amount": 0.0,
                **base,
                "groups": len(groups),
                "prunable": sum(g["channels"] for g in groups),
            }
        )
        for amount in [float(a) for a in args.amounts.split(",")]:
            small = prune_channels(net, x, amount=amount, importance="l1")
            with torch.no_grad():
                assert small(x).shape == net(x).shape
            r = {
                "net": name,
                "amount": amount,
                "params": count_params(small),
                "macs": count_macs(small, x),
            }
            r["params_x"], r["macs_x"] = r["params"] / base["params"], r["macs"] / base["macs"]
            rows.append(r)
            print(json.dumps(r), flush=True)
    summary = {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "git_commit": commit,
        "torch": torch.__version__,
        "image_size": args.image_size,
        "seconds": round(time.time() - t0, 1),
        "results": rows,
    }
    stem = "torchvision_" + args.torchvision.replace(",", "_")
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"# Structured pruning (L1, random init) of {args.torchvision}\n\n`{summary['command']}`"
        f" at `{commit}`, input 3x{args.image_size}x{args.image_size}, {summary['seconds']:.0f}"
        " s. Removed: the fraction of each prunable group (MLP hidden units).\n",
        "| net | removed | params | params x | MACs | MACs x |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["amount"] == 0:
            lines.append(
                f"| {r['net']} | dense ({r['groups']} groups, {r['prunable']:,} "
                f"prunable units) | {r['params']:,} | 1.000 | {r['macs']:,} | 1.000 |"
            )
        else:
            lines.append(
                f"| {r['net']} | {r['amount']:.0%} | {r['params']:,} | "
                f"{r['params_x']:.3f} | {r['macs']:,} | {r['macs_x']:.3f} |"
            )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def run_epochs(model, data, epochs, lr, gen, batch_size, extra_loss=None, masks_of=None):
    """SGD (momentum 0.9, weight decay 5e-4), cosine LR from ``lr`` over ``epochs``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    loader = tensor_loader(data["x_train"], data["y_train"], batch_size, True, gen)
    total = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if masks_of is not None:
                masks_of.step()
    return opt


@torch.no_grad()
def test_error(model, data) -> float:
    model.eval()
    wrong = 0
    for x, y in tensor_loader(data["x_test"], data["y_test"], 1000):
        wrong += int((model(x).argmax(1) != y).sum())
    return 100.0 * wrong / len(data["y_test"])


def describe(model, x1) -> dict:
    return {
        "macs": count_macs(model, x1),
        "params": count_params(model),
        "widths": {n: m.weight.shape[0] for n, m in model.named_modules() if hasattr(m, "weight")},
    }


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
    )
    return r.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.dense_epochs, args.ft_epochs, args.rounds, args.subset = 1, 1, 1, 6000
        args.amounts, args.taylor_batches = "0.5", 2
    out = Path(
        args.out or (ROOT / ("runs/structured-quick" if args.quick else "results/structured"))
    )
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)  # 2 shared cores: 1 thread each
    if args.torchvision:
        torchvision_rows(args, out)
        return
    torch.manual_seed(args.seed)
    data = load_mnist(args.data)
    if args.subset:
        data["x_train"], data["y_train"] = (
            data["x_train"][: args.subset],
            data["y_train"][: args.subset],
        )
    x1 = data["x_test"][:1]
    amounts = [float(a) for a in args.amounts.split(",")]
    methods = args.methods.split(",")
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    commit = git_commit()  # at the start: the code that ran, whatever changes meanwhile
    records = []

    def log(rec):
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "widths"}), flush=True)

    # dense nets: plain, and slimming's (L1 on the BN gammas during training)
    dense = LeNet5BN()
    init = copy.deepcopy(dense.state_dict())
    run_epochs(dense, data, args.dense_epochs, args.lr, gen, args.batch_size)
    base = describe(dense, x1)
    log({"method": "dense", "amount": 0.0, "error": test_error(dense, data), **base})
    dense_slim = None
    if "slimming" in methods:
        dense_slim = LeNet5BN()
        dense_slim.load_state_dict(init)
        gammas = [dense_slim.bn1.weight, dense_slim.bn2.weight]
        run_epochs(
            dense_slim, data, args.dense_epochs, args.lr, gen, args.batch_size,
            extra_loss=lambda: args.bn_l1 * sum(g.abs().sum() for g in gammas),
        )  # fmt: skip
        log({"method": "dense_slimming", "amount": 0.0, "error": test_error(dense_slim, data),
             **describe(dense_slim, x1)})  # fmt: skip

    taylor_archs = {}
    for method in [m for m in methods if m in METHODS]:
        for amount in amounts:
            model = sparsify(copy.deepcopy(dense_slim if method == "slimming" else dense))
            calib = None
            if method in ("taylor", "rls", "hessian"):
                n = args.hessian_batches if method == "hessian" else args.taylor_batches
                loader = tensor_loader(data["x_train"], data["y_train"], args.batch_size, True, gen)
                calib = [b for b, _ in zip(loader, range(n))]
            pruner = StructuredPruner(
                model, example_inputs=x1, importance=METHODS[method], data=calib,
                loss_fn=F.cross_entropy, seed=args.seed,
                bn_l1=args.bn_l1 if method == "slimming" else 0.0,
            )  # fmt: skip
            for r in range(1, args.rounds + 1):
                pruner.prune(amount * r / args.rounds)
                opt = run_epochs(
                    model, data, args.ft_epochs, args.ft_lr, gen, args.batch_size,
                    extra_loss=pruner.regularization_loss if method == "slimming" else None,
                )  # fmt: skip
                pruner.set_optimizer(opt)
                # weight decay / momentum never revive a masked weight: re-apply the masks
                with torch.no_grad():
                    for m in pruner.layers.values():
                        m.weight.mul_(m.mask)
            small = pruner.export()
            err = test_error(small, data)
            masked_err = test_error(model, data)
            rec = {"method": method, "amount": amount, "error": err, **describe(small, x1)}
            rec["masked_error"] = masked_err
            rec["kept_macs"] = rec["macs"] / base["macs"]
            rec["kept_params"] = rec["params"] / base["params"]
            rec["seconds"] = round(time.time() - t0, 1)
            log(rec)
            if method == "taylor":
                taylor_archs[amount] = small

    if "scratch" in methods:
        for amount, arch in taylor_archs.items():
            model = copy.deepcopy(arch)
            torch.manual_seed(args.seed + 1)
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_running_stats()
            epochs = args.dense_epochs + args.rounds * args.ft_epochs  # the same epochs in all
            run_epochs(model, data, epochs, args.lr, gen, args.batch_size)
            rec = {"method": "scratch", "amount": amount, "error": test_error(model, data),
                   **describe(model, x1)}  # fmt: skip
            rec["kept_macs"] = rec["macs"] / base["macs"]
            rec["kept_params"] = rec["params"] / base["params"]
            rec["seconds"] = round(time.time() - t0, 1)
            log(rec)

    summary = {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "git_commit": commit,
        "args": vars(args),
        "torch": torch.__version__,
        "seconds": round(time.time() - t0, 1),
        "model": "LeNet-5 (Caffe) + BatchNorm2d after conv1/conv2; MACs of conv+linear at 1x28x28",
        "results": records,
    }
    (out / "lenet5_mnist.json").write_text(json.dumps(summary, indent=1))
    write_table(summary, out / "lenet5_mnist.md")
    plot(summary, out / "lenet5_error_vs_flops.png")
    print(f"wrote {out}", flush=True)


def write_table(summary, path):
    base = next(r for r in summary["results"] if r["method"] == "dense")
    lines = [
        f"# LeNet-5 (+BN) on MNIST: structured pruning\n\n`{summary['command']}` at "
        f"`{summary['git_commit']}`, {summary['seconds']:.0f} s. Dense: {base['error']:.2f}% "
        f"error, {base['macs']:,} MACs, {base['params']:,} params.\n",
        "| method | removed | error % | MACs | FLOP reduction | params | widths conv1/conv2/fc1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        w = r["widths"]
        red = base["macs"] / r["macs"]
        lines.append(
            f"| {r['method']} | {r['amount']:.0%} | {r['error']:.2f} | {r['macs']:,} | "
            f"{red:.2f}x | {r['params']:,} | {w['conv1']}/{w['conv2']}/{w['fc1']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in summary["results"] if r["method"] == "dense")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in [*METHODS, "scratch"]:
        rs = sorted(
            (r for r in summary["results"] if r["method"] == method), key=lambda r: r["macs"]
        )
        if rs:
            ax.plot(
                [r["macs"] / base["macs"] for r in rs], [r["error"] for r in rs], "o-", label=method
            )
    ax.axhline(base["error"], color="k", ls=":", label="dense")
    ax.axhline(1.0, color="r", ls="--", lw=0.8, label="1% target")
    ax.axvline(1 / 3, color="gray", ls="--", lw=0.8, label="3x fewer FLOPs")
    ax.set_xlabel("kept FLOPs (MACs, fraction of dense)")
    ax.set_ylabel("test error %")
    ax.set_title("LeNet-5 (+BN), MNIST: channel / neuron removal")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
