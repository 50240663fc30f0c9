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
  epochs with the dense schedule;
- weights (--methods weights, the unstructured control of the TTS claim "removing whole neurons
  hurts more than removing weights"): global magnitude pruning of individual weights from the same
  dense net, with the same rounds and fine-tuning, to the parameter count of the structured net at
  that amount (biases and BN parameters count and stay dense). Its MACs are the dense net's: the
  zeros are not skipped by a dense kernel; ``kept_weight_macs`` counts only kept weights.
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

from scripts._lib import checks  # noqa: E402
from scripts._lib.flops import layer_positions  # noqa: E402
from scripts._lib.structured_report import plot, write_table  # noqa: E402
from scripts._lib.torchvision_rows import TORCHVISION_NETS, torchvision_rows  # noqa: E402
from sparsekern.nn import sparsify  # noqa: E402
from sparsekern.pruning import GlobalMagnitudePruner  # noqa: E402
from sparsekern.pruning.structured import (  # noqa: E402
    StructuredPruner,
    count_macs,
    count_params,
)
from sparsekern.training.data import load_mnist, tensor_loader  # noqa: E402
from sparsekern.training.report import write_json  # noqa: E402

METHODS = {"l1": "l1", "taylor": "taylor", "slimming": "bn_scale", "random": "random"}
METHODS |= {"rls": "rls", "hessian": "hessian_radius"}
DEFAULT_METHODS = ["l1", "taylor", "slimming", "random", "scratch"]
EXTRA_METHODS = ["scratch", "weights"]  # not StructuredPruner importances


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


QUICK = dict(
    dense_epochs=1,
    ft_epochs=1,
    rounds=1,
    subset=6000,
    amounts=[0.5],
    taylor_batches=2,
    hessian_batches=1,
)
DEFAULTS = dict(dense_epochs=3, ft_epochs=1, rounds=2, subset=0, amounts=[0.5, 0.7])
DEFAULTS |= dict(taylor_batches=20, hessian_batches=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    pos_int, nonneg_int = checks.number(int, 1), checks.number(int, 0)
    pos_float = checks.number(float, 0, lo_open=True)
    a("--amounts", type=checks.number_list(checks.fraction(lo_open=True, hi_open=True)),
      help="channel fractions removed, each in (0, 1) (default 0.5,0.7)")  # fmt: skip
    a("--methods", type=checks.choices_list([*METHODS, *EXTRA_METHODS]),
      default=DEFAULT_METHODS, help=f"any of {','.join([*METHODS, *EXTRA_METHODS])}")  # fmt: skip
    a("--dense-epochs", type=pos_int, help="default 3")
    a("--ft-epochs", type=nonneg_int, help="fine-tuning epochs after each round (default 1)")
    a("--rounds", type=pos_int, help="default 2")
    a("--lr", type=pos_float, default=0.05)
    a("--ft-lr", type=pos_float, default=0.01)
    a("--bn-l1", type=checks.number(float, 0), default=1e-4)
    a("--taylor-batches", type=pos_int, help="calibration batches, Taylor and RLS (default 20)")
    a("--hessian-batches", type=pos_int, help="batches of each Hessian-vector product (default 4)")
    a("--batch-size", type=pos_int, default=128)
    a("--subset", type=nonneg_int, help="train on the first N images (0: all)")
    a("--seed", type=nonneg_int, default=0)
    a("--threads", type=pos_int, default=1)
    a("--data", default=str(ROOT / "data" / "mnist"))
    a("--out", default=None)
    a("--quick", action="store_true", help="small values for what no flag sets (QUICK)")
    a("--torchvision", type=checks.choices_list(TORCHVISION_NETS), default=[],
      help="instead: params / MACs of these nets (random init, L1) at --amounts")  # fmt: skip
    a("--image-size", type=pos_int, default=224)
    args = p.parse_args(argv)
    for k, v in (DEFAULTS | (QUICK if args.quick else {})).items():
        if getattr(args, k) is None:  # --quick never overrides a value given on the line
            setattr(args, k, v)
    if "scratch" in args.methods and "taylor" not in args.methods:
        p.error("argument --methods: scratch retrains the Taylor-pruned nets; expected taylor too")
    if args.subset and args.subset < args.batch_size:
        p.error(f"argument --subset: expected >= --batch-size {args.batch_size}, got {args.subset}")
    checks.check_data_dir(p, "--data", args.data)
    args.out = args.out or str(
        ROOT / ("runs/structured-quick" if args.quick else "results/structured")
    )
    checks.check_out_dir(p, "--out", args.out)
    return args


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


def dense_nets(args, data, gen, log):
    """The dense net, and slimming's (L1 on the BN gammas during training) when it runs."""
    x1 = data["x_test"][:1]
    dense = LeNet5BN()
    init = copy.deepcopy(dense.state_dict())
    run_epochs(dense, data, args.dense_epochs, args.lr, gen, args.batch_size)
    base = describe(dense, x1)
    log({"method": "dense", "amount": 0.0, "error": test_error(dense, data), **base})
    dense_slim = None
    if "slimming" in args.methods:
        dense_slim = LeNet5BN()
        dense_slim.load_state_dict(init)
        gammas = [dense_slim.bn1.weight, dense_slim.bn2.weight]
        run_epochs(
            dense_slim, data, args.dense_epochs, args.lr, gen, args.batch_size,
            extra_loss=lambda: args.bn_l1 * sum(g.abs().sum() for g in gammas),
        )  # fmt: skip
        log({"method": "dense_slimming", "amount": 0.0, "error": test_error(dense_slim, data),
             **describe(dense_slim, x1)})  # fmt: skip
    return dense, dense_slim, base


def prune_one(args, data, gen, start, method, amount):
    """``start`` pruned by ``method`` to ``amount`` in --rounds rounds, fine-tuned after each;
    returns the masked model and the exported (physically smaller) one."""
    x1 = data["x_test"][:1]
    model = sparsify(copy.deepcopy(start))
    calib = None
    if method in ("taylor", "rls", "hessian"):
        n = args.hessian_batches if method == "hessian" else args.taylor_batches
        loader = tensor_loader(data["x_train"], data["y_train"], args.batch_size, True, gen)
        calib = [b for b, _ in zip(loader, range(n))]
    pruner = StructuredPruner(
        model, example_inputs=x1, importance=METHODS[method], data=calib,
        loss_fn=F.cross_entropy, seed=args.seed, bn_l1=args.bn_l1 if method == "slimming" else 0.0,
    )  # fmt: skip
    for r in range(1, args.rounds + 1):
        pruner.prune(amount * r / args.rounds)
        opt = run_epochs(
            model, data, args.ft_epochs, args.ft_lr, gen, args.batch_size,
            extra_loss=pruner.regularization_loss if method == "slimming" else None,
        )  # fmt: skip
        pruner.set_optimizer(opt)
        with torch.no_grad():  # weight decay / momentum never revive a masked weight
            for m in pruner.layers.values():
                m.weight.mul_(m.mask)
    return model, pruner.export()


def structured_params(start, x1, amount) -> int:
    """Parameters of ``start`` with ``amount`` of each group's channels / neurons removed (the
    count depends on the widths only, not on which channels go)."""
    model = sparsify(copy.deepcopy(start))
    pruner = StructuredPruner(model, example_inputs=x1, importance="l1")
    pruner.prune(amount)
    return count_params(pruner.export())


def prune_weights(args, data, gen, start, amount):
    """``start`` pruned weight by weight (global magnitude) in --rounds rounds, fine-tuned after
    each, to the parameter count of the structured net at ``amount``. Returns the masked model,
    its parameter count and its kept-weight MACs."""
    x1 = data["x_test"][:1]
    model = sparsify(copy.deepcopy(start))
    pruner = GlobalMagnitudePruner(model, sparsity=0.5)
    weights = sum(m.weight.numel() for m in pruner.layers.values())
    other = count_params(model) - weights  # biases, BN: dense in both arms
    target = structured_params(start, x1, amount)
    sparsity = 1 - (target - other) / weights
    for r in range(1, args.rounds + 1):
        pruner.prune(sparsity * r / args.rounds)
        opt = run_epochs(model, data, args.ft_epochs, args.ft_lr, gen, args.batch_size)
        pruner.set_optimizer(opt)
        with torch.no_grad():  # weight decay / momentum never revive a masked weight
            for m in pruner.layers.values():
                m.weight.mul_(m.mask)
    kept = sum(int(m.mask.count_nonzero()) for m in pruner.layers.values())
    macs = kept_weight_macs(model, x1)
    return model, other + kept, macs


def kept_weight_macs(model, x1) -> int:
    """MACs of conv + linear counting kept (nonzero) weights only: each kept weight once per
    output position of its layer (``flops.layer_positions``: ``H_out x W_out`` for a conv, 1 for
    a linear on ``[B, in]``), for one example ``x1`` ``[1, 1, 28, 28]``."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    positions = layer_positions(layers, model, x1)
    return sum(int(layers[n].weight.count_nonzero()) * p for n, p in positions.items())


def from_scratch(args, data, gen, arch):
    """The Taylor-pruned architecture re-initialised, trained for the same epochs in all."""
    model = copy.deepcopy(arch)
    torch.manual_seed(args.seed + 1)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
    epochs = args.dense_epochs + args.rounds * args.ft_epochs
    run_epochs(model, data, epochs, args.lr, gen, args.batch_size)
    return model


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.torchvision:
        torchvision_rows(
            args.torchvision, args.amounts, args.image_size, args.seed, out, git_commit()
        )
        return
    torch.set_num_threads(args.threads)  # 2 shared cores: 1 thread each
    torch.manual_seed(args.seed)
    data = load_mnist(args.data)
    if args.subset:
        data["x_train"], data["y_train"] = (
            data["x_train"][: args.subset],
            data["y_train"][: args.subset],
        )
    x1 = data["x_test"][:1]
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    commit = git_commit()  # at the start: the code that ran, whatever changes meanwhile
    records = []

    def log(rec):
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "widths"}), flush=True)

    def record(method, amount, model):
        rec = {"method": method, "amount": amount, "error": test_error(model, data)}
        rec |= describe(model, x1)
        rec["kept_macs"] = rec["macs"] / base["macs"]
        rec["kept_params"] = rec["params"] / base["params"]
        rec["seconds"] = round(time.time() - t0, 1)
        return rec

    dense, dense_slim, base = dense_nets(args, data, gen, log)
    taylor_archs = {}
    for method in [m for m in args.methods if m in METHODS]:
        for amount in args.amounts:
            start = dense_slim if method == "slimming" else dense
            model, small = prune_one(args, data, gen, start, method, amount)
            log(record(method, amount, small) | {"masked_error": test_error(model, data)})
            if method == "taylor":
                taylor_archs[amount] = small
    if "scratch" in args.methods:
        for amount, arch in taylor_archs.items():
            log(record("scratch", amount, from_scratch(args, data, gen, arch)))
    if "weights" in args.methods:
        for amount in args.amounts:
            model, params, macs = prune_weights(args, data, gen, dense, amount)
            rec = record("weights", amount, model) | {"params": params, "kept_weight_macs": macs}
            rec["kept_params"] = params / base["params"]
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
    write_json(out / "lenet5_mnist.json", summary)
    write_table(summary, out / "lenet5_mnist.md")
    plot(summary, out / "lenet5_error_vs_flops.png", [*METHODS, *EXTRA_METHODS])
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
