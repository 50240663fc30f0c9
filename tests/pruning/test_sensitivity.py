"""Sensitivity analysis (one layer at a time over qualities) and choosing qualities from it."""

import pytest
import torch
from torch import nn

from sparsekern.nn import sparsify
from sparsekern.pruning import SensitivityResult, choose_qualities, sensitivity_analysis


def _model():
    torch.manual_seed(0)
    return sparsify(
        nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    ).double()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _accuracy_against(model):
    """Accuracy on random inputs against the model's own dense predictions (baseline 1.0)."""
    x = torch.randn(256, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = model(x).argmax(1)

    def evaluate(m):
        with torch.no_grad():
            return (m(x).argmax(1) == labels).double().mean().item()

    return evaluate


def test_analysis_restores_model_and_reports_curves():
    model = _model()
    evaluate = _accuracy_against(model)
    before = _state(model)
    qs = [2.0, 0.0, 0.5, 1.0]
    res = sensitivity_analysis(model, evaluate, qs)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # weights and masks bit-identical
    assert res.baseline == 1.0
    assert res.qualities == [0.0, 0.5, 1.0, 2.0]
    assert list(res.accuracy) == ["0", "2", "4"]
    for layer in res.accuracy:
        assert res.accuracy[layer][0] == 1.0  # q = 0 prunes nothing
        assert res.kept[layer][0] == 1.0
        assert all(a > b for a, b in zip(res.kept[layer], res.kept[layer][1:]))
        assert res.drop(layer) == [1.0 - a for a in res.accuracy[layer]]
    # pruning the 3-output last layer hard hurts: its 2.0 point is below baseline
    assert res.accuracy["4"][-1] < 1.0
    assert "baseline" in res.table()


def test_analysis_subset_and_restore_on_error():
    model = _model()
    before = _state(model)
    calls = []

    def evaluate(m):
        calls.append(m[2].mask.sum().item())
        if len(calls) == 3:
            raise RuntimeError("boom")
        return 0.5

    with pytest.raises(RuntimeError, match="boom"):
        sensitivity_analysis(model, evaluate, [0.5, 1.0], layers=["2"])
    assert calls[1] < 256  # the second call saw layer "2" pruned
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(KeyError, match="'9'"):
        sensitivity_analysis(model, evaluate, [0.5], layers=["9"])


def test_choose_qualities():
    res = SensitivityResult(
        baseline=0.99,
        qualities=[0.5, 1.0, 1.5, 2.0],
        accuracy={"conv1": [0.99, 0.97, 0.90, 0.80], "fc1": [0.99, 0.99, 0.985, 0.99]},
        kept={"conv1": [0.6, 0.3, 0.1, 0.05], "fc1": [0.6, 0.3, 0.1, 0.05]},
    )
    assert choose_qualities(res, 0.005) == {"conv1": 0.5, "fc1": 2.0}
    assert choose_qualities(res, 0.02) == {"conv1": 1.0, "fc1": 2.0}
    res.accuracy["fc1"] = [0.99, 0.95, 0.99, 0.99]  # noisy: a dip, then recovers
    assert choose_qualities(res, 0.005)["fc1"] == 0.5
    assert choose_qualities(res, 0.005, contiguous=False)["fc1"] == 2.0
    res.accuracy["conv1"] = [0.5, 0.5, 0.5, 0.5]
    assert choose_qualities(res, 0.01)["conv1"] == 0.0  # over budget everywhere
    loss = SensitivityResult(1.0, [1.0, 2.0], {"a": [1.05, 1.3]}, {"a": [0.5, 0.2]}, False)
    assert loss.drop("a") == pytest.approx([0.05, 0.3])
    assert choose_qualities(loss, 0.1) == {"a": 1.0}
