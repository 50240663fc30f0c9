"""RigL under DistributedDataParallel (2 CPU ranks, gloo): every rank must end with the same
masks *and the same weights*. Before the fix each rank grew from its own dense gradient; DDP's
buffer broadcast then copied rank 0's mask over weights another rank had zeroed under its own, and
the ranks' weights drifted apart while a mask-hash check still passed."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from sparsekern import sparsify
from sparsekern.nn import check_masks
from sparsekern.pruning import RigLPruner

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank (DDP checks that too)
        model = sparsify(nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 5)))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        # a different RNG per rank: without the broadcast the random initial masks would differ
        gen = torch.Generator().manual_seed(100 + rank)
        pruner = RigLPruner(model, opt, sparsity=0.75, total_steps=16, delta=2, alpha=0.5,
                            generator=gen)  # fmt: skip
        pruner.prune()
        first = {n: m.mask.clone() for n, m in pruner.layers.items()}
        data = torch.Generator().manual_seed(7 + rank)  # each rank its own shard of the data
        moved = 0
        for _ in range(12):
            x = torch.randn(16, 12, generator=data)
            y = torch.randint(0, 5, (16,), generator=data)
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
            moved += sum(pruner.last_update.get("moved", {}).values()) if pruner.last_update else 0
        torch.save(
            {
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "first": first,
                "problems": check_masks(model),
                "updates": sum(1 for h in pruner.history if h.get("event") == "update"),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_masks_and_weights(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert got[0]["updates"] >= 4  # the updates happened (steps 2, 4, ... before t_end = 12)
    for r in range(1, world):
        for k in got[0]["first"]:
            assert torch.equal(got[0]["first"][k], got[r]["first"][k]), f"initial mask {k}"
        for k, v in got[0]["state"].items():
            assert torch.equal(v, got[r]["state"][k]), f"rank {r} differs from rank 0 at {k}"
    for g in got:
        assert not g["problems"]
        for k, v in g["state"].items():
            if k.endswith("mask"):
                w = g["state"][k[: -len("mask")] + "weight"]
                assert int(w[~v].count_nonzero()) == 0, k
    # the masks did move (the test exercises drop/grow, not a frozen mask)
    k = next(k for k in got[0]["state"] if k.endswith("mask"))
    assert not torch.equal(got[0]["state"][k], got[0]["first"][k.rsplit(".", 1)[0]])
