"""Early-CROP's training compute (scripts/_lib/flops.py) against a hand count on a tiny net."""

import pytest
import torch
from torch import nn

from scripts._lib.flops import early_prune_compute, layer_positions
from sparsekern.nn import sparse_modules, sparsify


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)  # 6x6 -> 4x4: 16 positions
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_early_prune_compute_matches_a_hand_count():
    torch.manual_seed(0)
    model = sparsify(Tiny())
    layers = dict(sparse_modules(model))
    pos = layer_positions(layers, model, torch.randn(1, 2, 6, 6))
    assert pos == {"conv": 16, "fc": 1}
    conv, fc = layers["conv"], layers["fc"]
    keep_c = torch.zeros_like(conv.mask)
    keep_c.view(-1)[:27] = True  # 27 of 54 conv weights
    keep_f = torch.zeros_like(fc.mask)
    keep_f.view(-1)[:12] = True  # 12 of 240 fc weights
    conv.set_mask(keep_c)
    fc.set_mask(keep_f)
    batch, dense_steps, total_steps = 4, 3, 10
    # per example: conv 3 x 2 x 3 x 3 = 54 MACs at each of 16 positions, fc 48 x 5 = 240
    dense = 54 * 16 + 240
    sparse = 27 * 16 + 12
    want_train = 3 * batch * (dense_steps * dense + (total_steps - dense_steps) * sparse)
    want_after = 3 * batch * total_steps * dense
    got = early_prune_compute(layers, pos, batch, dense_steps, total_steps)
    assert got["macs_dense_step"] == 3 * batch * dense
    assert got["macs_sparse_step"] == 3 * batch * sparse
    assert got["macs_training"] == want_train and got["macs_prune_after"] == want_after
    assert got["flops_saved"] == pytest.approx(1 - want_train / want_after)


def test_layer_positions_restores_the_model_when_the_forward_raises():
    model = Tiny().train()
    with pytest.raises(RuntimeError):
        layer_positions({"conv": model.conv}, model, torch.randn(1, 1, 6, 6))  # 1 channel, not 2
    assert model.training and not model.conv._forward_hooks
