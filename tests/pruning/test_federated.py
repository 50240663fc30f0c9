"""Federated pruning: FedAvg is exact for identical clients, clients respect the server's masks,
the splits are McMahan's (IID / label shards), and a process-per-client run over torch.distributed
(gloo, 2 CPU ranks) ends with the in-process simulation's weights and masks, bitwise."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sparsekern.nn import check_masks, sparsify
from sparsekern.pruning import FederatedPruning, Geometric, split_clients


def _model():
    torch.manual_seed(0)
    return sparsify(nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)))


def _clients(k, n=24, seed=5):
    g = torch.Generator().manual_seed(seed)
    sizes = [n + 3 * i for i in range(k)]
    return [
        (torch.randn(s, 10, generator=g), torch.randint(0, 3, (s,), generator=g)) for s in sizes
    ]


def test_aggregation_exact_for_identical_clients():
    model = _model()
    fed = FederatedPruning(model, lr=0.1, batch_size=8)
    data = _clients(1)[0]
    local = fed.client_update(0, data)
    # three clients with the same data and the same seed train to the same weights
    fed.seed = 0
    rows = [fed._contribution(local, n) for n in (7, 30, 101)]
    fed._aggregate(rows, [7, 30, 101])
    for (k, v), (_, w) in zip(model.state_dict().items(), local.state_dict().items()):
        assert torch.equal(v, w), k


def test_fedavg_weighted_mean_and_masks_respected():
    model = _model()
    fed = FederatedPruning(model, schedule=Geometric(0.8, rounds=2), lr=0.1, batch_size=8)
    clients = _clients(3)
    fed.run_round(clients)
    assert abs(fed.current_sparsity() - (1 - 0.2**0.5)) < 0.02
    masks = {n: m.mask.clone() for n, m in fed.layers.items()}
    locals_ = [fed.client_update(k, d) for k, d in enumerate(clients)]
    for loc in locals_:
        assert not check_masks(loc)
        for n, m in loc.named_modules():
            if n in masks:
                assert torch.equal(m.mask, masks[n])
                assert int(m.weight[~m.mask].count_nonzero()) == 0
    # the server's average is sum n_k w_k / sum n_k (float64 reference)
    counts = [d[0].shape[0] for d in clients]
    ref = {k: sum(c * loc.state_dict()[k].double() for c, loc in zip(counts, locals_)) / sum(counts)
           for k in fed._keys}  # fmt: skip
    fed._aggregate([fed._contribution(loc, c) for loc, c in zip(locals_, counts)], counts)
    for k, v in ref.items():
        torch.testing.assert_close(model.state_dict()[k].double(), v, rtol=1e-6, atol=1e-7)
    fed._server_prune()
    assert abs(fed.current_sparsity() - 0.8) < 0.01


def test_splits():
    labels = torch.arange(10).repeat_interleave(20)
    g = torch.Generator().manual_seed(0)
    iid = split_clients(labels, 5, iid=True, generator=g)
    non = split_clients(labels, 5, iid=False, shards_per_client=2, generator=g)
    for parts in (iid, non):
        allidx = torch.cat(parts)
        assert allidx.numel() == 200 and allidx.unique().numel() == 200
    assert max(labels[p].unique().numel() for p in non) <= 2
    assert min(labels[p].unique().numel() for p in iid) >= 5
    with pytest.raises(ValueError, match="labels"):
        split_clients(labels.view(10, 20), 5)


def _worker(rank, world, init_file, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        clients = _clients(world)
        fed = FederatedPruning(_model(), schedule=Geometric(0.75, rounds=2), lr=0.1, batch_size=8)
        for _ in range(3):
            fed.run_round_distributed({rank: clients[rank]}, world)
        sim = FederatedPruning(_model(), schedule=Geometric(0.75, rounds=2), lr=0.1, batch_size=8)
        for _ in range(3):
            sim.run_round(clients)
        torch.save(
            {"dist": dict(fed.model.state_dict()), "sim": dict(sim.model.state_dict())},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)
def test_distributed_matches_simulation(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for r in range(world):
        for k, v in got[r]["sim"].items():
            assert torch.equal(got[r]["dist"][k], v), f"rank {r}: {k} differs from simulation"
            assert torch.equal(got[0]["dist"][k], got[r]["dist"][k]), k
    mask = got[0]["dist"]["0.mask"]
    assert 0.2 < float(mask.float().mean()) < 0.3  # pruned to 75%
