"""execution_plan: one entry per sparse layer, the path its forward runs, and why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsekern.nn import SparseLinear, execution_plan


def test_plan_lists_sparse_layers_with_path_and_reason():
    model = nn.Sequential(SparseLinear(6, 4), nn.ReLU(), SparseLinear(4, 3, block_size=16))
    model(torch.randn(5, 6)).sum().backward()
    plan = execution_plan(model)
    assert [e.name for e in plan] == ["0", "2"]
    assert plan[0].input_shape == (5, 6) and plan[1].input_shape == (5, 4)
    assert plan[1].path == "block" and "block" in plan[1].why
    assert plan[0].kept == 1.0 and plan[0].why
    with torch.no_grad():
        assert execution_plan(model)[0].path == "dense"
    assert execution_plan(model, training=False)[0].path == "dense"


def test_plan_kept_follows_mask_edits():
    layer = SparseLinear(10, 10)
    layer.mask[:5] = False
    assert execution_plan(nn.Sequential(layer))[0].kept == pytest.approx(0.5)
    layer.set_mask(torch.zeros(10, 10, dtype=torch.bool))
    assert execution_plan(nn.Sequential(layer))[0].kept == 0.0


def test_plan_rejects_non_module():
    with pytest.raises(TypeError, match="expected an nn.Module, got NoneType"):
        execution_plan(None)
