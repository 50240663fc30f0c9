"""Han's Table 2 columns on a model small enough to count by hand."""

import pytest
import torch
from torch import nn

from sparsekern.nn import set_mask, sparsify
from sparsekern.pruning import format_report, layer_report
from sparsekern.pruning.report import _human


class Tiny(nn.Module):
    """conv(1->2, 3x3, no bias) -> relu -> flatten -> fc(8 -> 3, no bias); input [B, 1, 4, 4]:
    the conv has 2 x 2 = 4 output positions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, bias=False)
        self.fc = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _tiny():
    model = sparsify(Tiny()).double()
    with torch.no_grad():
        model.conv.weight[0].fill_(1.0)  # channel 0: positive on an all-ones input
        model.conv.weight[1].fill_(-1.0)  # channel 1: negative -> ReLU zeroes it
        model.fc.weight.fill_(1.0)
    cm = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    cm.view(2, 9)[0, :5] = True
    cm.view(2, 9)[1, :4] = True  # 9 of 18 kept
    set_mask(model.conv, cm)
    fm = torch.zeros(3, 8, dtype=torch.bool)
    fm[0, :3] = True
    fm[1, :3] = True  # 6 of 24 kept; row 2 all pruned -> output 2 is 0
    set_mask(model.fc, fm)
    return model


def test_numbers_by_hand():
    model = _tiny()
    model.train()
    x = torch.ones(2, 1, 4, 4, dtype=torch.float64)
    conv, fc, total = layer_report(model, x)
    assert model.training  # mode restored
    assert conv["layer"] == "conv" and conv["kind"] == "conv"
    assert (conv["weights"], conv["weights_kept"]) == (18, 9)
    assert conv["flop"] == 2 * 18 * 4 and conv["flop_kept"] == 2 * 9 * 4  # 4 positions
    assert conv["input_act_pct"] == 100.0
    assert conv["act_pct"] == 50.0  # channel 1 is all zeros after ReLU
    assert conv["weights_kept_pct"] == 50.0 and conv["flop_kept_pct"] == 50.0
    assert conv["flop_kept_act_pct"] == 50.0
    assert (fc["weights"], fc["weights_kept"]) == (24, 6)
    assert fc["flop"] == 48 and fc["flop_kept"] == 12
    assert fc["input_act_pct"] == 50.0
    assert fc["act_pct"] == pytest.approx(200 / 3)  # outputs 15, 15, 0
    assert fc["weights_kept_pct"] == 25.0 and fc["flop_kept_pct"] == 25.0
    assert fc["flop_kept_act_pct"] == 12.5  # 25% of weights x 50% of inputs
    assert total["layer"] == "total"
    assert (total["weights"], total["weights_kept"]) == (42, 15)
    assert total["flop"] == 192 and total["flop_kept"] == 84
    assert total["weights_kept_pct"] == pytest.approx(100 * 15 / 42)
    assert total["flop_kept_pct"] == pytest.approx(43.75)
    assert total["flop_kept_act_pct"] == pytest.approx(100 * (72 + 6) / 192)
    assert total["act_pct"] == pytest.approx(100 * 12 / 22)  # (8 + 4) of (16 + 6)
    # no hooks left behind
    assert not model.conv._forward_hooks and not model.fc._forward_hooks


def test_dense_model_and_format():
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10))
    rows = layer_report(model, torch.randn(4, 784))
    assert [r["weights_kept_pct"] for r in rows] == [100.0, 100.0, 100.0]
    assert rows[0]["flop"] == 2 * 784 * 300
    text = format_report(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["Layer", "Weights", "FLOP"]
    assert lines[-1].startswith("total") and "238K" in lines[-1]  # 784*300 + 300*10
    assert len(lines) == 6  # header, rule, 2 layers, rule, total


def test_human_numbers():
    assert _human(431080) == "431K"
    assert _human(2.3e6) == "2.3M"
    assert _human(211e6) == "211M"
    assert _human(1.5e9) == "1.5B"
    assert _human(500) == "500"
