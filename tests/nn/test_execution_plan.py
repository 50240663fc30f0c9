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


def _big_sparse_layer(kept=0.05, n=512, k=512):  # 6 N K M >= 1e8 at 64 rows
    layer = SparseLinear(k, n)
    layer.set_mask(torch.rand(n, k) < kept)
    return layer


def test_low_density_layer_runs_the_sparse_path_and_matches_masked(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = _big_sparse_layer()
    x = torch.randn(64, 512, requires_grad=True)
    y = layer(x)
    plan = execution_plan(nn.Sequential(layer))[0]
    assert plan.path == "sparse" and "kept 0.05" in plan.why and plan.input_shape == (64, 512)
    y.sum().backward()
    w = layer.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x2, w * layer.mask, layer.bias.detach())
    ref.sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.weight.grad, w.grad * layer.mask)
    assert bool((layer.weight.grad[~layer.mask] == 0).all())
    dense = _big_sparse_layer(kept=0.6)
    dense(torch.randn(64, 512))
    entry = execution_plan(nn.Sequential(dense))[0]
    assert entry.path == "masked" and f"kept {entry.kept:.3f} >" in entry.why


def test_in_place_mask_edit_is_honoured_under_torch_compile(monkeypatch):
    # The compiled forward cannot see version counters; it re-applies the mask every call.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    layer = SparseLinear(16, 8)
    eager = SparseLinear(16, 8)
    eager.load_state_dict(layer.state_dict())
    compiled = torch.compile(layer, backend="aot_eager")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (layer, eager)]
    x = torch.randn(4, 16)
    for step in range(4):
        if step == 2:
            layer.mask[:, :8] = False
            eager.mask[:, :8] = False
        for mod, opt in zip((compiled, eager), opts):
            opt.zero_grad()
            mod(x).pow(2).sum().backward()
            opt.step()
        torch.testing.assert_close(layer.weight, eager.weight)
    assert bool((layer.weight[:, :8] == 0).all())
    torch.testing.assert_close(compiled(x), eager(x))


def test_static_rule_decisions_and_reasons():
    from sparsekern.ops.sparse_train.rule import sparse_pays

    cpu, f32 = torch.device("cpu"), torch.float32
    assert sparse_pays(64, 4096, 9216, 0.05, cpu, f32)[0]
    ok, why = sparse_pays(64, 4096, 9216, 0.5, cpu, f32)
    assert not ok and "kept 0.500 >" in why
    assert sparse_pays(64, 4096, 9216, 0.12, cpu, f32, compact=True)[0]
    assert not sparse_pays(64, 4096, 9216, 0.13, cpu, f32)[0]
    assert sparse_pays(64, 4096, 9216, 0.1, cpu, f32)[0]  # 90%: the masked path measured 1.03-1.15x
    assert "cuda" in sparse_pays(64, 4096, 9216, 0.01, torch.device("cuda"), f32)[1]
    assert "bfloat16" in sparse_pays(64, 4096, 9216, 0.01, cpu, torch.bfloat16)[1]
    # under 64 rows dense storage pays only at kept <= 0.0875 (16 rows: 0.63-0.83 at 0.05, 0.93-1.09
    # at 0.1); compact storage keeps its threshold
    assert sparse_pays(16, 4096, 4096, 0.05, cpu, f32)[0]
    assert not sparse_pays(16, 4096, 4096, 0.1, cpu, f32)[0]
    assert sparse_pays(16, 4096, 4096, 0.1, cpu, f32, compact=True)[0]
    assert "< 16" in sparse_pays(8, 4096, 9216, 0.01, cpu, f32)[1]
    assert "dense storage" in sparse_pays(16, 4096, 4096, 0.05, cpu, f32)[1]
    assert sparse_pays(16, 4096, 4096, 0.05, cpu, f32, compact=True)[0]
    assert "small step" in sparse_pays(64, 10, 10, 0.01, cpu, f32)[1]
    assert "assumed" in sparse_pays(None, 4096, 9216, 0.05, cpu, f32)[1]


def test_cached_choice_follows_everything_it_depends_on():
    """The forward's choice is cached on the mask: it must change with the mask (in place), the
    batch, the grad mode, requires_grad and the block size, and the cache must not keep the
    layer alive."""
    import gc
    import weakref

    torch.manual_seed(0)
    layer = SparseLinear(2048, 1024)
    layer.mask.zero_()
    layer.mask[:, :40] = True  # kept 0.02: sparse at 128 rows
    with torch.no_grad():
        layer.weight.mul_(layer.mask)
    assert layer.execution_path((128, 2048)).path == "sparse"
    assert layer.execution_path((128, 2048)).path == "sparse"  # the cached one
    assert layer.execution_path((4, 2048)).path == "masked"  # batch < 16
    with torch.no_grad():
        assert layer.execution_path((128, 2048)).path == "dense"
    layer.weight.requires_grad_(False)
    assert layer.execution_path((128, 2048)).path == "dense"
    layer.weight.requires_grad_(True)
    layer.mask.fill_(True)  # in place: the version counter moves
    choice = layer.execution_path((128, 2048))
    assert choice.path == "dense" and choice.kept == 1.0 and "all True" in choice.why
    layer.mask[0, 0] = False  # one entry pruned in place: the masked dW is needed again
    assert layer.execution_path((128, 2048)).path == "masked"
    layer.set_block_size(16)
    assert layer.execution_path((128, 2048)).path == "block"
    ref = weakref.ref(layer)
    del layer, choice
    gc.collect()
    assert ref() is None


def test_cached_choice_follows_the_extension_switch(monkeypatch):
    """Only layers the C++ kernels could run key their cached choice on SPARSEKERN_NO_EXT; for
    those, the same layer must answer as a fresh one does after the switch flips, both ways."""
    from sparsekern.nn import SparseConv2d

    def fresh(cls):
        torch.manual_seed(0)
        if cls is SparseLinear:
            layer = SparseLinear(2048, 1024)
            layer.set_mask(torch.rand(1024, 2048) < 0.02)
            return layer, (128, 2048)
        layer = SparseConv2d(16, 16, 3, padding=1)
        layer.set_mask(torch.rand(layer.weight.shape) < 0.05)
        return layer, (32, 16, 6, 6)

    for cls in (SparseLinear, SparseConv2d):
        layer, shape = fresh(cls)
        for env in ("0", "1", "0"):
            monkeypatch.setenv("SPARSEKERN_NO_EXT", env)
            assert layer.execution_path(shape) == fresh(cls)[0].execution_path(shape), (cls, env)
