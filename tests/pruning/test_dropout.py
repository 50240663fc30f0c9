"""Han's dropout rule D_r = D_o sqrt(C_ir / C_io) and finding the dropout feeding each layer."""

import math

import pytest
import torch
from torch import nn

from sparsekern.nn import sparsify
from sparsekern.pruning import adjusted_dropout, apply_dropout_adjustment, find_dropout_feeds


def test_formula():
    assert adjusted_dropout(0.5, 100, 100) == 0.5
    assert adjusted_dropout(0.5, 100, 9) == pytest.approx(0.15)  # LeNet fc2 at 9%: 0.5*0.3
    assert adjusted_dropout(0.5, 100, 25) == pytest.approx(0.25)
    assert adjusted_dropout(0.5, 100, 0) == 0.0
    assert adjusted_dropout(0.3, 4096 * 4096, 4096 * 4096 // 11) == pytest.approx(
        0.3 * math.sqrt((4096 * 4096 // 11) / (4096 * 4096))
    )
    with pytest.raises(ValueError, match="c_retrain <= c_original = 10, got 11"):
        adjusted_dropout(0.5, 10, 11)
    with pytest.raises(ValueError, match=r"p_original in \[0, 1\], got 1.5"):
        adjusted_dropout(1.5, 10, 5)
    with pytest.raises(ValueError, match="c_original > 0"):
        adjusted_dropout(0.5, 0, 0)


class Registered(nn.Module):
    """Dropout modules registered after the layers they feed (as in models/lenet.py)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 4)
        self.fc3 = nn.Linear(4, 2)
        self.d1 = nn.Dropout(0.5)
        self.d2 = nn.Dropout(0.4)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(self.d1(x)))
        return self.fc3(self.d2(x))


class Untraceable(Registered):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 1
        return super().forward(x)


def test_feeds_by_tracing():
    assert find_dropout_feeds(sparsify(Registered())) == {"d1": "fc2", "d2": "fc3"}
    seq = sparsify(nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert find_dropout_feeds(seq) == {"0": "1"}


class UntraceableSeq(nn.Sequential):
    def forward(self, x):
        if x.sum() > 0:
            x = x * 1
        return super().forward(x)


def test_feeds_fallback_registration_order():
    # fx fails on both; registration order puts d1, d2 after fc3, so nothing follows them ...
    assert find_dropout_feeds(sparsify(Untraceable())) == {}
    # ... while in a Sequential the order of registration is the order of use
    model = UntraceableSeq(nn.Linear(4, 4), nn.Dropout(0.2), nn.Linear(4, 2))
    assert find_dropout_feeds(sparsify(model)) == {"1": "2"}


def test_apply_adjustment():
    model = sparsify(Registered())
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, :2] = True  # 8 of 24 kept
    model.fc2.set_mask(mask)
    out = apply_dropout_adjustment(
        model, {"d1": "fc2"}, {"d1": 0.5}, {"fc2": 24}
    )  # fc3 untouched: d2 not listed
    assert out == {"d1": pytest.approx(0.5 * math.sqrt(8 / 24))}
    assert model.d1.p == out["d1"] and model.d2.p == 0.4
