"""Sparse training under FSDP2 (``fully_shard``) on 2 CPU ranks (gloo): every pruner decides as
one process does, the masks are sharded like their weights, every execution path gives the
one-process result, and a run killed after a sharded checkpoint resumes bitwise.

Each test is one ``mp.spawn`` of 2 ranks covering several cases (a spawn costs ~10 s of imports on
2 shared cores). Every rank also runs the one-process reference itself (an unsharded copy of the
model on the whole batch; each FSDP rank trains on its half: FSDP's averaged reduce-scatter is the
gradient of the mean loss over the whole batch)."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD = 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int) -> None:
    # the block path as a CPU user runs it: conftest's TRITON_INTERPRET=1 (for the kernel tests)
    # runs the Triton kernels through the interpreter, 4 s a step here instead of 10 ms
    os.environ.pop("TRITON_INTERPRET", None)
    # the sparse path by its torch.sparse twin: two ranks loading the C++ extension at once wait
    # on its build lock, and rebuild it (2 minutes here) when the cache holds another checkout's
    # build; the extension itself is tested in tests/ops
    os.environ["SPARSEKERN_NO_EXT"] = "1"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=(_port(), *args), nprocs=WORLD, join=True)


def _mlp(seed: int = 0, dims=(12, 10, 9, 3)) -> nn.Module:
    from sparsekern import sparsify

    torch.manual_seed(seed)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return sparsify(nn.Sequential(*layers[:-1]))


def _batches(steps: int, rows: int = 8, d_in: int = 12, classes: int = 3, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, d_in, generator=g), torch.randint(classes, (rows,), generator=g))
            for _ in range(steps)]  # fmt: skip


def _half(t: torch.Tensor, rank: int) -> torch.Tensor:
    n = t.shape[0] // WORLD
    return t[rank * n : (rank + 1) * n]


def _full(t):
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def _pruner_cases(solo):
    from sparsekern.pruning import (
        BlockPruner,
        GaPPruner,
        GibbsPruner,
        GlobalMagnitudePruner,
        GradualPruner,
        HanPruner,
        ImportancePruner,
        NMDecayPruner,
        NMPruner,
        RigLPruner,
        SCLPruner,
        SNIPPruner,
        SRSTEPruner,
        TaylorImportance,
    )

    # (name, factory(model, opt, group), closure at prune time? (None: no prune)); RigL
    # updates every step
    return [
        ("global_magnitude", lambda m, o, g: GlobalMagnitudePruner(m, o, sparsity=0.9), False),
        ("han", lambda m, o, g: HanPruner(m, o, sparsity=0.7), False),
        (
            "gradual",
            lambda m, o, g: GradualPruner(
                m, o, sparsity=0.8, begin_step=0, end_step=4, frequency=1
            ),
            False,
        ),  # fmt: skip
        ("nm", lambda m, o, g: NMPruner(m, o, layers=["0", "2"], n_m=(2, 4)), False),
        (
            "block",
            lambda m, o, g: BlockPruner(m, o, sparsity=0.5, block_size=(16, 16), layers=["2"]),
            False,
        ),  # fmt: skip
        ("snip", lambda m, o, g: SNIPPruner(m, o, sparsity=0.8), True),
        (
            "rigl",
            lambda m, o, g: RigLPruner(
                m,
                o,
                sparsity=0.75,
                total_steps=8,
                delta=1,
                alpha=0.5,
                process_group=g,
                generator=torch.Generator().manual_seed(3),
            ),
            False,
        ),  # fmt: skip
        (
            "nm_decay",
            lambda m, o, g: NMDecayPruner(
                m, o, layers=["0", "2"], n_m=(2, 4), total_steps=8, decay_steps=2
            ),
            False,
        ),
        (
            "gap",
            lambda m, o, g: GaPPruner(m, o, sparsity=0.8, interval=1, groups=2, total_steps=8),
            False,
        ),
        (
            "taylor",
            lambda m, o, g: ImportancePruner(m, o, importance=TaylorImportance(), sparsity=0.7),
            True,
        ),
        # latent values of pruned weights sharded like the weights; the mask every step from
        # the dense weights; the decay moves the pruned (latent) ones
        ("srste", lambda m, o, g: SRSTEPruner(m, o, n_m=(2, 4), decay=0.05, lr=3.0), False),
        (  # every rank draws the one-process random numbers: rank 0's generator state (here
            # each rank seeds its own differently), sampled on the full tensors
            "gibbs",
            lambda m, o, g: GibbsPruner(
                m,
                o,
                sparsity=0.6,
                total_steps=6,
                generator=torch.Generator().manual_seed(4 + (dist.get_rank() if g is None else 0)),
            ),
            None,  # no prune(): it would freeze; samples at steps 1-3, the T = 0 mask at 4
        ),
        (  # mask scores (from the whole weight's mean) and latent values sharded; the STE
            # gradient of the scores from the gathered dense gradient; a global top-k
            "scl",
            lambda m, o, g: SCLPruner(m, o, sparsity=0.7, end_step=4, mask_lr=0.5),
            None,
        ),
    ]


def _pruners_worker(rank: int, port: int) -> None:
    from torch.distributed.tensor import DTensor

    from sparsekern.nn import check_masks
    from sparsekern.training.distributed import shard_model

    _init(rank, port)
    try:
        solo = [dist.new_group([r]) for r in range(WORLD)][rank]  # a one-process reference
        batches = _batches(4)
        for name, make, closure_at_prune in _pruner_cases(solo):
            ref = _mlp(dims=(12, 48, 32, 3) if name == "block" else (12, 10, 9, 3))
            model = shard_model(copy.deepcopy(ref))
            for _, m in model.named_modules():
                if hasattr(m, "mask"):
                    assert isinstance(m.mask, DTensor), name  # masks follow their weights
                    assert m.mask.placements == m.weight.placements, name
                    assert m.mask.to_local().shape == m.weight.to_local().shape, name
            ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            torch.manual_seed(11)
            ref_p = make(ref, ref_opt, solo)
            torch.manual_seed(11)
            p = make(model, opt, None)
            x0, y0 = batches[0]
            xh, yh = _half(x0, rank), _half(y0, rank)
            c = lambda m=model, x=xh, y=yh: F.cross_entropy(m(x), y)  # noqa: E731
            if closure_at_prune is not None:
                ref_p.prune(
                    closure=(lambda r=ref, x=x0, y=y0: F.cross_entropy(r(x), y))
                    if closure_at_prune
                    else None
                )
                p.prune(closure=c if closure_at_prune else None)
            for x, y in batches:
                for net, o, pr, xb, yb in (
                    (ref, ref_opt, ref_p, x, y),
                    (model, opt, p, _half(x, rank), _half(y, rank)),
                ):
                    loss = F.cross_entropy(net(xb), yb) + pr.regularization_loss()
                    o.zero_grad()
                    loss.backward()
                    o.step()
                    pr.step(lambda net=net, xb=xb, yb=yb: F.cross_entropy(net(xb), yb))
            ref_layers = dict(ref.named_modules())
            for n, m in model.named_modules():
                if not hasattr(m, "mask"):
                    continue
                r = ref_layers[n]
                mask, w = _full(m.mask), _full(m.weight.detach())
                assert torch.equal(mask, r.mask), f"{name} {n}: masks differ from one process"
                assert not w[~mask].any(), f"{name} {n}: pruned weights not exactly zero"
                torch.testing.assert_close(w, r.weight.detach(), rtol=0, atol=1e-5)
                mom = opt.state[m.weight].get("momentum_buffer")
                if mom is not None:  # optimizer state of the shards masked like the weights
                    assert not _full(mom)[~mask].any(), f"{name} {n}: momentum at pruned entries"
            assert p.kept_fractions() == ref_p.kept_fractions(), (
                name,
                p.kept_fractions(),
                ref_p.kept_fractions(),
            )
            assert p.current_sparsity() == ref_p.current_sparsity(), name
            if name == "rigl":  # the drop/grow really ran on gathered gradients
                assert sum(p.last_update["moved"].values()) > 0
            for attr in ("latent", "scores"):  # sharded like the weights; whole in state dicts
                if name not in ("srste", "gibbs", "scl") or not hasattr(p, attr):
                    continue  # (SNIP's scores: plain, computed whole inside the decision)
                for n, t in getattr(p, attr).items():
                    assert isinstance(t, DTensor), (name, attr, n)
                    assert t.placements == p.layers[n].weight.placements, (name, attr, n)
                sd, ref_sd = p.state_dict(), ref_p.state_dict()
                assert any(t.any() for t in ref_sd[attr].values()), name  # values kept
                for n, t in ref_sd[attr].items():
                    assert type(sd[attr][n]) is torch.Tensor, (name, attr, n)
                    torch.testing.assert_close(sd[attr][n], t, rtol=0, atol=1e-5)
                for t in getattr(p, attr).values():
                    t.to_local().zero_()
                p.load_state_dict(sd)  # each rank keeps its rows of the saved whole state
                for n, t in ref_sd[attr].items():
                    assert isinstance(getattr(p, attr)[n], DTensor), (name, attr, n)
                    torch.testing.assert_close(_full(getattr(p, attr)[n]), t, rtol=0, atol=1e-5)
            if name in ("srste", "gibbs", "scl"):  # the masks moved during training
                assert ref_p.rounds > 1 and p.rounds == ref_p.rounds, (name, p.rounds, ref_p.rounds)
            xt = batches[0][0]
            torch.testing.assert_close(model(xt), ref(xt), rtol=0, atol=1e-5)
            assert not check_masks(ref), name
        _omni(rank)
        _loop_under_engines(rank)
        _issue_repro(rank)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _omni(rank: int) -> None:
    """OmniSparsity: every level's nested masks ranked on the whole weights and sharded like
    them; a level sampled per step, the same on every rank (rank 0's draw: here each rank's
    generator is seeded differently); the supernet ends where one process ends."""
    from torch.distributed.tensor import DTensor

    from sparsekern.pruning import OmniSparsity
    from sparsekern.training.distributed import shard_model

    ref = _mlp()
    model = shard_model(copy.deepcopy(ref))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    levels = (0.5, 0.75, 0.9)
    ref_p = OmniSparsity(ref, ref_opt, levels=levels, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7 + rank)
    p = OmniSparsity(model, opt, levels=levels, generator=gen)
    drawn = {}
    for x, y in _batches(4, seed=13):
        for key, net, o, pr, xb, yb in (
            ("ref", ref, ref_opt, ref_p, x, y),
            ("fsdp", model, opt, p, _half(x, rank), _half(y, rank)),
        ):
            with pr.sample() as s:
                drawn.setdefault(key, []).append(s)
                loss = F.cross_entropy(net(xb), yb)
                o.zero_grad()
                loss.backward()
                o.step()
            pr.step()
    assert drawn["fsdp"] == drawn["ref"] and len(set(drawn["ref"])) > 1, drawn
    for s in levels:
        assert p.level_sparsity(s) == ref_p.level_sparsity(s), s
        for n, mk in ref_p.masks[s].items():
            assert isinstance(p.masks[s][n], DTensor), (s, n)
            assert torch.equal(_full(p.masks[s][n]), mk), (s, n)
    ref_layers = dict(ref.named_modules())
    for n in p.layers:
        torch.testing.assert_close(
            _full(p.layers[n].weight.detach()), ref_layers[n].weight.detach(), rtol=0, atol=1e-5
        )
        assert torch.equal(_full(p.layers[n].mask), ref_layers[n].mask), n
    sd = p.state_dict()
    assert all(type(t) is torch.Tensor for d in sd["masks"].values() for t in d.values())
    p.load_state_dict(sd)
    assert all(isinstance(t, DTensor) for d in p.masks.values() for t in d.values())
    with pytest.raises(NotImplementedError, match="at_sparsity: expected an unsharded"):
        p.at_sparsity(0.5)


def _issue_repro(rank: int) -> None:
    """The user's own ``fully_shard`` (the root only, masks left whole) and the pruner right
    away: the pruner shards the masks itself; ``set_mask`` takes a full mask on a sharded layer."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from sparsekern.nn import set_mask
    from sparsekern.pruning import GlobalMagnitudePruner

    ref = _mlp()
    model = copy.deepcopy(ref)
    fully_shard(model)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for net, o, part in ((ref, ref_opt, False), (model, opt, True)):
        for x, y in _batches(2, seed=9):
            xb, yb = (_half(x, rank), _half(y, rank)) if part else (x, y)
            o.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            o.step()  # moments everywhere before pruning
        with torch.no_grad():  # FSDP keeps the root's weights gathered after this forward
            net(_batches(1)[0][0])
        GlobalMagnitudePruner(net, o, sparsity=0.9).prune()
    assert isinstance(model[0].mask, DTensor)
    from sparsekern.pruning import OneShotPruner

    with pytest.raises(NotImplementedError, match="OneShotPruner: expected a model whose weights"):
        OneShotPruner(model, calibration=[_batches(1)[0][0]], method="wanda", sparsity=0.5)
    assert isinstance(model[0].mask, DTensor)
    drop = torch.rand(ref[2].weight.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    set_mask(ref[2], ref[2].mask & drop, ref_opt)
    set_mask(model[2], _full(model[2].mask) & drop, opt)
    for x, y in _batches(2):
        for net, o, xb, yb in ((ref, ref_opt, x, y), (model, opt, _half(x, rank), _half(y, rank))):
            o.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            o.step()
    for i in (0, 2, 4):
        mask = _full(model[i].mask)
        assert torch.equal(mask, ref[i].mask), i
        torch.testing.assert_close(_full(model[i].weight.detach()), ref[i].weight.detach(),
                                   rtol=0, atol=1e-5)  # fmt: skip
        for key in ("exp_avg", "exp_avg_sq"):  # Adam's moments of the shards: zero where pruned
            assert not _full(opt.state[model[i].weight][key])[~mask].any(), (i, key)
    from sparsekern.nn import check_masks

    assert check_masks(model) == []


def _loop_under_engines(rank: int) -> None:
    """``train_epoch`` (the package's training loop, with a gradual pruner) under each engine of
    ``distribute``, chosen by its one argument: FSDP2 and DDP end where one process ends."""
    from sparsekern.pruning import GradualPruner
    from sparsekern.training import evaluate, train_epoch
    from sparsekern.training.distributed import distribute

    batches = _batches(4)
    ends = {}
    for engine in ("none", "ddp", "fsdp"):
        model, net = distribute(_mlp(), engine)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        pruner = GradualPruner(model, opt, sparsity=0.8, begin_step=0, end_step=3, frequency=1)
        # one process: the whole batch; an engine: this rank's half
        loader = batches if engine == "none" else [(_half(x, rank), _half(y, rank))
                                                   for x, y in batches]  # fmt: skip
        out = train_epoch(model, loader, opt, pruner, net=net)
        assert out["mask_changes"] == 3, (engine, out)
        ev = evaluate(model, [(_half(x, rank), _half(y, rank)) for x, y in batches[:1]])
        ends[engine] = (
            {k: _full(v).detach().clone() for k, v in model.state_dict().items()},
            ev["images"],
        )
    assert ends["ddp"][1] == ends["fsdp"][1] == 8  # both ranks' halves counted
    for engine in ("ddp", "fsdp"):
        for k, v in ends["none"][0].items():
            got = ends[engine][0][k.removeprefix("module.")]
            if v.dtype == torch.bool:
                assert torch.equal(got, v), (engine, k)
            else:
                torch.testing.assert_close(got, v, rtol=0, atol=1e-5)


def test_pruners_under_fully_shard_decide_as_one_process():
    _spawn(_pruners_worker)


class _PathNet(nn.Module):
    """A conv (masked path), a block-mode linear, a 95%-sparse linear (the CSR ``sparse`` path
    from 64 rows on the CPU) and a half-dense linear (vendor GEMM with the masked dW)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.block = nn.Linear(6 * 4 * 4, 128)
        self.sparse = nn.Linear(128, 1024)  # 1.0e8 FLOPs a step at 128 rows: CSR pays
        self.masked = nn.Linear(1024, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.masked(torch.relu(self.sparse(torch.relu(self.block(h)))))


def _path_model(seed: int = 0) -> nn.Module:
    from sparsekern import sparsify

    torch.manual_seed(seed)
    model = sparsify(_PathNet())
    model.block.set_block_size(16)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for m, keep in ((model.conv, 0.5), (model.block, 0.5), (model.sparse, 0.05),
                        (model.masked, 0.5)):  # fmt: skip
            score = torch.rand(m.weight.shape, generator=g)
            if m is model.block:  # whole 16 x 16 blocks
                score = score[::16, ::16].repeat_interleave(16, 0).repeat_interleave(16, 1)
            m.set_mask(score >= torch.quantile(score.flatten(), 1 - keep))
    return model


def _paths_worker(rank: int, port: int) -> None:
    from sparsekern.nn import execution_plan
    from sparsekern.training.distributed import shard_model

    _init(rank, port)
    try:
        ref = _path_model()
        model = shard_model(copy.deepcopy(ref))
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(256, 2, 4, 4, generator=g), torch.randint(5, (256,), generator=g)
        for _ in range(3):
            for net, o, xb, yb in (
                (ref, ref_opt, x, y),
                (model, opt, _half(x, rank), _half(y, rank)),
            ):
                loss = F.cross_entropy(net(xb), yb)
                o.zero_grad()
                loss.backward()
                o.step()
        paths = {e.name: e.path for e in execution_plan(model)}
        want = {"conv": "masked", "block": "block", "sparse": "sparse", "masked": "masked"}
        assert paths == want, paths
        assert {e.name: e.path for e in execution_plan(ref)} == want
        assert {e.name: e.kept for e in execution_plan(model)} == {
            e.name: e.kept for e in execution_plan(ref)
        }
        ref_mods = dict(ref.named_modules())
        for n in want:
            m, r = getattr(model, n), ref_mods[n]
            w = _full(m.weight.detach())
            assert torch.equal(_full(m.mask), r.mask), n
            assert not w[~r.mask].any(), n
            torch.testing.assert_close(w, r.weight.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x[:16]), ref(x[:16]), rtol=0, atol=1e-5)
        # an in-place edit of a sharded mask is seen at the next forward (the guard)
        with torch.no_grad():
            model.masked.mask.fill_(False)
            ref.masked.mask.fill_(False)
        torch.testing.assert_close(model(x[:4]), ref(x[:4]), rtol=0, atol=1e-5)
        assert not _full(model.masked.weight.detach()).any()

        # HSDP: a 2 x 1 mesh (2 replicas of 1-rank shard groups) builds and trains on gloo
        from torch.distributed.tensor import Replicate, Shard

        from sparsekern.pruning import GlobalMagnitudePruner
        from sparsekern.training.distributed import distribute

        ref = _mlp()
        model, net = distribute(copy.deepcopy(ref), "hsdp", hsdp_replicas=2)
        assert net is model
        assert model[0].mask.placements == model[0].weight.placements == (Replicate(), Shard(0))
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        GlobalMagnitudePruner(ref, ref_opt, sparsity=0.9).prune()
        GlobalMagnitudePruner(model, opt, sparsity=0.9).prune()
        for x, y in _batches(3):
            for net, o, xb, yb in (
                (ref, ref_opt, x, y),
                (model, opt, _half(x, rank), _half(y, rank)),
            ):
                o.zero_grad()
                F.cross_entropy(net(xb), yb).backward()
                o.step()
        for i in (0, 2, 4):
            assert torch.equal(_full(model[i].mask), ref[i].mask)
            torch.testing.assert_close(_full(model[i].weight.detach()), ref[i].weight.detach(),
                                       rtol=0, atol=1e-5)  # fmt: skip

        _compact_under_fully_shard(rank)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _compact_model(seed: int = 0) -> nn.Module:
    # compact storage: a 5%-dense 128 x 1024 layer (the CSR ``sparse`` path at 128 rows: 1.0e8
    # FLOPs a step) between two half-dense ones (dense rebuild + GEMM); masks drawn on dense
    # storage, then loaded
    from sparsekern import sparsify

    def net():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 1024), nn.ReLU(),
                             nn.Linear(1024, 5))  # fmt: skip

    dense = sparsify(net())
    g = torch.Generator().manual_seed(seed + 1)
    for i, keep in ((0, 0.5), (2, 0.05), (4, 0.5)):
        dense[i].set_mask(torch.rand(dense[i].weight.shape, generator=g) < keep)
    model = sparsify(net(), storage="compact")
    model.load_state_dict(dense.state_dict())
    return model


def _compact_under_fully_shard(rank: int) -> None:
    """Compact storage: FSDP shards ``values [nnz]`` (a contiguous chunk of the kept weights per
    rank), the mask and its index stay whole; training matches one process; a mask change is
    refused before anything changes."""
    from torch.distributed.tensor import Shard

    from sparsekern.nn import execution_plan, set_mask
    from sparsekern.pruning import GlobalMagnitudePruner
    from sparsekern.training import CheckpointError
    from sparsekern.training.distributed import (
        full_optimizer_state,
        full_state_dict,
        gather_objects,
        load_full_into_sharded,
        load_sharded,
        save_sharded,
        shard_model,
    )

    ref = _compact_model()
    model = shard_model(copy.deepcopy(ref))
    for i in (0, 2, 4):
        v, nnz = model[i].values, ref[i].values.numel()
        assert type(v).__name__ == "DTensor" and v.placements == (Shard(0),), i
        assert v.shape == (nnz,)
        assert v.to_local().shape[0] == len(torch.chunk(torch.arange(nnz), WORLD)[rank])
        assert type(model[i].mask).__name__ == "Tensor" and torch.equal(model[i].mask, ref[i].mask)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(256, 32, generator=g), torch.randint(5, (256,), generator=g)
    for _ in range(3):
        for net, o, xb, yb in ((ref, ref_opt, x, y), (model, opt, _half(x, rank), _half(y, rank))):
            o.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            o.step()
    want = ["reference", "sparse", "reference"]
    assert [e.path for e in execution_plan(ref)] == want
    assert [e.path for e in execution_plan(model)] == want
    sd, ref_sd = full_state_dict(model), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for i in (0, 2, 4):
        mask = ref_sd[f"{i}.mask"]
        assert torch.equal(sd[f"{i}.mask"], mask)
        assert not sd[f"{i}.weight"][~mask].any()  # pruned weights exactly zero
        assert not torch.equal(sd[f"{i}.weight"], _compact_model().state_dict()[f"{i}.weight"])
        for k in ("weight", "bias"):
            torch.testing.assert_close(sd[f"{i}.{k}"], ref_sd[f"{i}.{k}"], rtol=0, atol=1e-5)
        st = opt.state[model[i].values]["exp_avg"]
        assert type(st).__name__ == "DTensor" and st.shape == model[i].values.shape
    torch.testing.assert_close(model(x[:16]), ref(x[:16]), rtol=0, atol=1e-5)

    # a sharded checkpoint and a full (one-process) state dict load back bitwise
    tmp = gather_objects(tempfile.mkdtemp() if rank == 0 else None)[0]
    save_sharded(Path(tmp) / "ck", model, opt)
    other = shard_model(_compact_model(seed=1))  # other masks: refused before any load
    try:
        load_sharded(Path(tmp) / "ck", other, torch.optim.Adam(other.parameters()))
        raise AssertionError("a checkpoint with other masks loaded into sharded compact layers")
    except CheckpointError as e:
        assert "masks" in str(e) and "nothing loaded" in str(e), e
    for full in (False, True):
        back = shard_model(_compact_model())
        back_opt = torch.optim.Adam(back.parameters(), lr=0.01)
        if full:
            load_full_into_sharded(back, dict(sd))
        else:
            load_sharded(Path(tmp) / "ck", back, back_opt)
            a, b = full_optimizer_state(opt)["state"], full_optimizer_state(back_opt)["state"]
            assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
        got = full_state_dict(back)
        assert all(torch.equal(got[k], sd[k]) for k in sd), full
    dist.barrier()
    if rank == 0:
        shutil.rmtree(tmp)

    # a mask change (set_mask, a pruner, a load with another mask, an in-place edit) would
    # resize the sharded values: refused, nothing changed
    before = (full_state_dict(model), [s["exp_avg"].to_local().clone() for s in opt.state.values()])
    new = ~ref[2].mask
    for attempt, err in (
        (lambda: set_mask(model[2], new, opt), RuntimeError),
        (lambda: GlobalMagnitudePruner(model, opt, sparsity=0.99), NotImplementedError),
        (lambda: model.load_state_dict({**ref_sd, "2.mask": new}), RuntimeError),
    ):
        try:
            attempt()
            raise AssertionError("a mask change on sharded compact values was accepted")
        except err as e:
            assert "fixed" in str(e) and "FSDP" in str(e), e
    after = (full_state_dict(model), [s["exp_avg"].to_local() for s in opt.state.values()])
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
    # a load with the same masks: each rank keeps its chunk of the values
    model.load_state_dict(_compact_model().state_dict())
    torch.testing.assert_close(model(x[:16]), _compact_model()(x[:16]), rtol=0, atol=1e-6)
    with torch.no_grad():
        model[4].mask[0, :] = False
    try:
        model(x[:4])
        raise AssertionError("an in-place mask edit of a sharded compact layer was accepted")
    except RuntimeError as e:
        assert "in-place edit" in str(e) and "FSDP" in str(e), e


def test_execution_paths_under_fully_shard_give_the_one_process_result():
    _spawn(_paths_worker)


def _ckpt_run(rank, model, opt, pruner, batches, start, stop):
    for i in range(start, stop):
        x, y = batches[i]
        xb, yb = _half(x, rank), _half(y, rank)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step(lambda xb=xb, yb=yb: F.cross_entropy(model(xb), yb))


def _ckpt_setup(seed: int, engine: str = "fsdp"):
    from sparsekern.pruning import RigLPruner
    from sparsekern.training.distributed import distribute

    model, _ = distribute(_mlp(seed), engine)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    pruner = RigLPruner(model, opt, sparsity=0.75, total_steps=12, delta=2, alpha=0.5,
                        generator=gen)  # fmt: skip
    return model, opt, pruner


def _opt_bytes(opt) -> list:
    return [_full(v).clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


def _ckpt_worker(rank: int, port: int, tmp: str) -> None:
    from sparsekern.training import CheckpointError, load_checkpoint, save_checkpoint
    from sparsekern.training.distributed import (
        load_full_into_sharded,
        load_sharded,
        save_sharded,
        shard_model,
        state_digest,
    )

    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(1)
    batches = _batches(6)
    try:
        # the uninterrupted run: 6 steps (RigL updates at steps 2 and 4)
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg0", rank=rank, world_size=2)
        model, opt, pruner = _ckpt_setup(0)
        pruner.prune()
        _ckpt_run(rank, model, opt, pruner, batches, 0, 6)
        want = (state_digest(model), _opt_bytes(opt), pruner.state_dict())
        # the killed run: 3 steps, a sharded checkpoint, then the process group is gone
        model, opt, pruner = _ckpt_setup(0)
        pruner.prune()
        _ckpt_run(rank, model, opt, pruner, batches, 0, 3)
        save_sharded(f"{tmp}/ck", model, opt, pruner, extra={"step": 3})
        dist.destroy_process_group()

        # a new process group, a model built from another seed: everything comes from the folder
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg1", rank=rank, world_size=2)
        model, opt, pruner = _ckpt_setup(1)
        extra = load_sharded(f"{tmp}/ck", model, opt, pruner)
        assert extra == {"step": 3}
        _ckpt_run(rank, model, opt, pruner, batches, extra["step"], 6)
        got = (state_digest(model), _opt_bytes(opt), pruner.state_dict())
        assert got[0] == want[0], "resumed weights/masks differ from the uninterrupted run"
        assert len(got[1]) == len(want[1]) and all(
            torch.equal(a, b) for a, b in zip(got[1], want[1])
        ), "resumed optimizer state differs"
        assert got[2] == want[2], "resumed pruner state differs"

        # a second save replaces the first atomically (no partial or old folder left)
        save_sharded(f"{tmp}/ck", model, opt, pruner, extra={"step": 6})
        again, opt2, pruner2 = _ckpt_setup(2)
        assert load_sharded(f"{tmp}/ck", again, opt2, pruner2) == {"step": 6}
        assert state_digest(again) == want[0]
        left = [f for f in os.listdir(tmp) if f.endswith((".partial", ".old"))]
        assert not left, left

        # a corrupted shard is refused before anything is loaded
        dist.barrier()
        if rank == 0:
            f = next(p for p in sorted(os.listdir(f"{tmp}/ck")) if p.endswith(".distcp"))
            with open(f"{tmp}/ck/{f}", "r+b") as fh:
                fh.seek(10)
                b = fh.read(1)
                fh.seek(10)
                fh.write(bytes([b[0] ^ 1]))
        dist.barrier()
        before = state_digest(model)
        try:
            load_sharded(f"{tmp}/ck", model, opt, pruner)
            raise AssertionError("a corrupted checkpoint was loaded")
        except CheckpointError as e:
            assert "corrupted" in str(e), e
        assert state_digest(model) == before

        # the package's single-file checkpoint (one process) into a sharded model
        ref = _mlp(4)
        with torch.no_grad():
            for m in (ref[0], ref[2]):
                m.set_mask(torch.rand(m.weight.shape) > 0.6)
        if rank == 0:
            save_checkpoint(f"{tmp}/one.pt", {"model": ref.state_dict()}, "test/fsdp")
        dist.barrier()
        sharded = shard_model(_mlp(5))
        load_full_into_sharded(sharded, load_checkpoint(f"{tmp}/one.pt", "test/fsdp")["model"])
        for k, v in ref.state_dict().items():
            assert torch.equal(_full(sharded.state_dict()[k]), v), k
        x = batches[0][0]
        torch.testing.assert_close(sharded(x), ref(x), rtol=0, atol=1e-6)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_sharded_checkpoint_resumes_bitwise_and_single_file_loads(tmp_path):
    mp.spawn(_ckpt_worker, args=(0, str(tmp_path)), nprocs=WORLD, join=True)


def test_training_loop_under_torchrun_with_the_engine_argument(tmp_path):
    """``torchrun --nproc_per_node 2`` runs the package's loop (DataLoader, DistributedSampler,
    ``setup_distributed`` from torchrun's environment) under FSDP2 by ``--engine fsdp``; the
    final weights, masks and error counts are the one-process run's."""
    out = tmp_path / "end.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSEKERN_NO_EXT": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(Path(__file__).with_name("torchrun_loop.py")), "--engine", "fsdp",
           "--out", str(out)]  # fmt: skip
    # its own session: a hang kills torchrun's workers too, not only the launcher
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise
    done = sorted(r for r in (0, 1) if f"torchrun_loop: rank {r} done" in err)
    assert proc.returncode == 0, f"ranks that finished their work: {done} of [0, 1]\n{err[-3000:]}"
    assert done == [0, 1], err[-3000:]
    end = torch.load(out, weights_only=True)
    assert end["world"] == 2
    from tests.distributed.torchrun_loop import dataset, run

    ref_state, ref_ev = run("none", dataset(), 1)  # one process (here), the whole batches
    assert end["ev"] == ref_ev
    for k, v in ref_state.items():
        if v.dtype == torch.bool:
            assert torch.equal(end["state"][k], v), k
        else:
            torch.testing.assert_close(end["state"][k], v, rtol=0, atol=1e-5)
