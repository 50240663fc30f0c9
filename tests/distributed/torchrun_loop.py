"""Launched by ``torchrun --nproc_per_node 2`` (tests/distributed/test_fsdp.py): the package's
training loop over a DataLoader with a DistributedSampler, under the engine named by the one
argument ``--engine``, from torchrun's environment; rank 0 writes the full final state (and a
one-process run's) to ``--out`` for the test to compare."""

import argparse
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from sparsekern import sparsify
from sparsekern.pruning import GlobalMagnitudePruner
from sparsekern.training import distributed as dist
from sparsekern.training import evaluate, train_epoch


def run(engine: str, data, world: int):
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)))
    model, net = dist.distribute(model, engine)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = GlobalMagnitudePruner(model, opt, sparsity=0.8)
    pruner.prune()
    sampler = DistributedSampler(data, shuffle=False) if engine != "none" else None
    loader = DataLoader(data, batch_size=16 // world, sampler=sampler)
    for epoch in range(2):
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_epoch(model, loader, opt, pruner, net=net)
    ev = evaluate(model, loader)
    state = {k: (v.full_tensor() if type(v).__name__ == "DTensor" else v).detach().clone()
             for k, v in model.state_dict().items()}  # fmt: skip
    return state, ev


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(64, 12, generator=g), torch.randint(3, (64,), generator=g))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=dist.ENGINES, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    env = dist.setup_distributed(threads=1)
    os.environ.pop("TRITON_INTERPRET", None)
    state, ev = run(args.engine, dataset(), env.world)
    if env.main:
        torch.save({"state": state, "ev": ev, "world": env.world}, args.out)
    dist.barrier()
    dist.shutdown()
    # The test reads this line to tell a crash in the work from one after it.
    print(f"torchrun_loop: rank {env.rank} done", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Skip interpreter finalisation: once in ~100 CI runs gloo's C++ teardown aborted a rank
    # there ("terminate called without an active exception", SIGABRT) after the work was done;
    # nothing is left to finalise (the file is written, the process group destroyed).
    os._exit(0)


if __name__ == "__main__":
    main()
