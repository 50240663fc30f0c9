"""Distributed helpers in one process (digests, the mask check), and the checked exports."""

import pytest
import torch

from models import build_model
from sparsekern.nn import BlockSparseLinear, sparsify
from sparsekern.pruning import GlobalMagnitudePruner
from sparsekern.training import distributed as dist
from sparsekern.training.export import export_block_sparse, save_compressed_checked

pytestmark = pytest.mark.usefixtures("reference_path")


def test_single_process_helpers():
    env = dist.setup_distributed()
    assert (env.rank, env.world, env.main) == (0, 1, True) and not dist.is_dist()
    assert dist.gather_objects(3) == [3]
    t = torch.ones(2)
    assert dist.all_sum(t) is t and torch.equal(t, torch.ones(2))


def test_mask_mismatch_across_ranks_fails_loudly(monkeypatch):
    model = build_model("lenet300")
    assert dist.check_masks_identical(model, "here") == [dist.mask_digest(model)]
    other = build_model("lenet300")
    other.fc3.mask[0, 0] = False  # what rank 1 would report if one entry differed
    assert dist.mask_digest(other) != dist.mask_digest(model)
    assert dist.state_digest(model) != dist.state_digest(build_model("lenet300"))  # other init
    fake = [dist.mask_digest(model), dist.mask_digest(other)]
    monkeypatch.setattr(dist, "gather_objects", lambda obj: fake)
    with pytest.raises(RuntimeError, match="masks differ across ranks after pruning round 1"):
        dist.check_masks_identical(model, "after pruning round 1")


def test_exports_are_checked(tmp_path):
    model = build_model("lenet300")
    GlobalMagnitudePruner(model, sparsity=0.9).prune()
    rep = save_compressed_checked(model, tmp_path / "m.skr", lambda: build_model("lenet300"))
    assert rep["round_trip"] == "exact" and rep["path"] == "m.skr" and rep["file_bytes"] > 0
    net = sparsify(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 16)))  # fmt: skip
    GlobalMagnitudePruner(net, sparsity=0.8).prune()
    rebuild = lambda: sparsify(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),  # noqa: E731
                                                   torch.nn.Linear(32, 16)))  # fmt: skip
    out = export_block_sparse(net, torch.randn(4, 64), 16, tmp_path / "b.pt", rebuild)
    assert out["status"].startswith("ok, 2 layers") and out["max_abs_diff"] < 1e-4
    assert all(v["blocks_stored"] >= v["weights_kept"] for v in out["layers"].values())
    from sparsekern.nn import load_inference, to_inference

    back = load_inference(tmp_path / "b.pt", to_inference(rebuild(), block_size=(16, 16)))
    assert isinstance(back[0], BlockSparseLinear)
    raw = bytearray((tmp_path / "b.pt").read_bytes())  # the export is checksummed: a flip refused
    raw[len(raw) // 2] ^= 0x10
    (tmp_path / "b.pt").write_bytes(bytes(raw))
    with pytest.raises(Exception, match="b.pt"):
        load_inference(tmp_path / "b.pt")
