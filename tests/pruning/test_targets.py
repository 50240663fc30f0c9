"""Per-layer targets: from a sensitivity analysis (budget by share of weights), in proportions
(exact total), and Han's choice among them."""

import math

import pytest

from sparsekern.nn import sparsify
from sparsekern.pruning import (
    SensitivityResult,
    han_targets,
    proportional_targets,
    sensitivity_targets,
    sparse_layers,
)
from tests.helpers import TinyNet


def test_sensitivity_targets_budget_by_share():
    layers = sparse_layers(sparsify(TinyNet()))  # conv 36, fc1 1024, fc2 64 weights
    res = SensitivityResult(
        baseline=90.0,
        qualities=[0.5, 1.0, 1.5],
        accuracy={"conv": [89, 80, 70], "fc1": [90, 89.5, 85], "fc2": [90, 89.9, 89]},
        kept={"conv": [0.7, 0.4, 0.2], "fc1": [0.6, 0.3, 0.1], "fc2": [0.6, 0.3, 0.1]},
    )
    t = sensitivity_targets(res, layers, max_drop=1.0)
    share = {n: m.weight.numel() / 1124 for n, m in layers.items()}
    assert t.budget == pytest.approx({n: math.sqrt(s) for n, s in share.items()})
    # fc1 may lose 0.95 points: q 1.0 (0.5 lost) is in, q 1.5 (5) is not -> kept 0.3
    assert t.quality == {"conv": 0.0, "fc1": 1.0, "fc2": 1.0}
    assert t.sparsity == pytest.approx({"conv": 0.0, "fc1": 0.7, "fc2": 0.7})
    with pytest.raises(ValueError, match="max_drop > 0"):
        sensitivity_targets(res, layers, 0)


def test_proportional_targets_hit_the_total():
    layers = sparse_layers(sparsify(TinyNet()))
    t = proportional_targets(layers, {"conv": 0.66, "fc1": 0.08, "fc2": 0.19}, 0.9)
    kept = sum((1 - t[n]) * m.weight.numel() for n, m in layers.items())
    assert kept == pytest.approx(round(0.1 * 1124))
    assert (1 - t["conv"]) / (1 - t["fc1"]) == pytest.approx(0.66 / 0.08, rel=0.05)
    with pytest.raises(KeyError, match="expected proportions for"):
        proportional_targets(layers, {"fc1": 1.0}, 0.5)


def test_han_targets_order():
    layers = sparse_layers(sparsify(TinyNet()))
    keep = {"conv": 0.66, "fc1": 0.08, "fc2": 0.19}
    assert han_targets(layers, keep, sparsity={"fc1": 0.5}) == {"fc1": 0.5}
    assert han_targets(layers, keep, sensitivity={"fc1": 0.7}) == {"fc1": 0.7}
    assert han_targets(layers, keep) == pytest.approx({"conv": 0.34, "fc1": 0.92, "fc2": 0.81})
    assert set(han_targets(layers, keep, sparsity=0.9)) == set(layers)
