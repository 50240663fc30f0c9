"""Block pruning (sparsekern.pruning.block): scores, per-layer and global selection, conv weights on
their GEMM view, monotone masks, errors."""

import pytest
import torch
from torch import nn

from sparsekern.formats.block_sparse import block_occupancy
from sparsekern.nn import sparsify
from sparsekern.ops.block_sparse_conv2d import conv_block_occupancy
from sparsekern.pruning.block import (
    block_magnitude_mask,
    block_scores,
    expand_block_mask,
    prune_blocks_,
)


def test_scores_are_per_weight_means_so_edge_blocks_compete_fairly():
    w = torch.ones(20, 20)  # 16x16 blocks: one full block, three partial ones
    w[16:, 16:] = 3.0
    s1 = block_scores(w, 16, "l1")
    assert s1.shape == (2, 2)
    torch.testing.assert_close(s1, torch.tensor([[1.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
    w2 = torch.zeros(16, 16)
    w2[0, :4] = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert block_scores(w2, 16, "l2").item() == pytest.approx(5.0 / 16)
    assert block_scores(w2, 16, "l1").item() == pytest.approx(7.0 / 256)


def test_mask_picks_the_largest_blocks_exactly():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * 0.01
    big = [(0, 1), (2, 5), (3, 3)]  # block coordinates at 16x16
    for r, c in big:
        w[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] += 1.0
    m = block_magnitude_mask(w, (16, 16), density=3 / 24)
    occ = block_occupancy(m, (16, 16))
    assert sorted(map(tuple, occ.nonzero().tolist())) == big
    assert m.sum() == 3 * 256


def test_mask_is_monotone():
    torch.manual_seed(0)
    w = torch.randn(48, 48)
    old = torch.rand(48, 48) < 0.8
    new = block_magnitude_mask(w, 16, 0.5, mask=old)
    assert not (new & ~old).any(), "a pruned weight came back"


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_per_layer_density_counts(density):
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(100, 80), nn.Linear(80, 40)), block_size=(32, 16))
    prune_blocks_(model, density=density)
    for layer in model:
        occ = block_occupancy(layer.mask, (32, 16))
        assert int(occ.sum()) == round(density * occ.numel())
        full = expand_block_mask(occ, layer.weight.shape, (32, 16))
        assert torch.equal(layer.mask, full), "mask is not made of whole blocks"
        assert (layer.weight[~layer.mask] == 0).all()


def test_global_scope_with_floor():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), block_size=16)
    with torch.no_grad():
        model[0].weight.mul_(100.0)  # layer 0 dominates a global ranking
    with pytest.warns(RuntimeWarning, match="keep no weight"):
        kept = prune_blocks_(model, density=0.5, scope="global", min_density=0)
    assert kept["0"] == 1.0 and kept["1"] == 0.0
    model = sparsify(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), block_size=16)
    with torch.no_grad():
        model[0].weight.mul_(100.0)
    kept = prune_blocks_(model, density=0.5, scope="global")  # the default floor: one block
    assert kept["1"] == 1 / 16 and kept["0"] == 15 / 16
    model = sparsify(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), block_size=16)
    with torch.no_grad():
        model[0].weight.mul_(100.0)
    kept = prune_blocks_(model, density=0.5, scope="global", min_density=0.25)
    assert kept["1"] == 0.25 and kept["0"] == 0.75
    assert (kept["0"] + kept["1"]) / 2 == 0.5


def test_conv_weights_on_their_tap_major_view():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Conv2d(8, 20, 3)))
    prune_blocks_(model, density=0.5, block_size=(16, 16))
    mask = model[0].mask
    occ = conv_block_occupancy(mask, (16, 16))  # 2 block-rows x 9 taps x 1 channel block
    assert occ.shape == (2, 9) and int(occ.sum()) == 9
    assert torch.equal(mask, expand_block_mask(occ, mask.shape, 16))
    # one block = 16 output x 8 input channels of one tap: all kept or all pruned
    for r in range(2):
        for tap in range(9):
            blk = mask[r * 16 : (r + 1) * 16, :, tap // 3, tap % 3]
            assert blk.all() or not blk.any()


def test_errors():
    model = sparsify(nn.Sequential(nn.Linear(40, 40)))
    with pytest.raises(ValueError, match="block_size=\\(bm, bk\\) or layers in block mode"):
        prune_blocks_(model, density=0.5)
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\], got 1.5"):
        prune_blocks_(model, density=1.5, block_size=16)
    with pytest.raises(ValueError, match="norm must be one of"):
        prune_blocks_(model, density=0.5, block_size=16, norm="l3")
    with pytest.raises(ValueError, match="scope must be"):
        prune_blocks_(model, density=0.5, block_size=16, scope="net")
    with pytest.raises(KeyError, match="unknown \\['fc9'\\]"):
        prune_blocks_(model, density={"fc9": 0.5}, block_size=16)
    assert model[0].mask.all(), "a failed call changed the mask"
    with pytest.raises(ValueError, match="expected a model with sparse layers"):
        prune_blocks_(nn.Linear(4, 4), density=0.5, block_size=16)
