"""sparsify(storage="compact"): the parameter is the kept weights; state dicts stay dense-keyed;
mask changes re-pack values and optimizer state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import CompactSparseLinear, SparseLinear, execution_plan, set_mask
from sparsekern.ops.sparse_train import sparse_linear_reference


def _model():
    return nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4))


def test_parameters_are_kept_weights_and_output_unchanged():
    model = _model()
    x = torch.randn(5, 12)
    masks = [torch.rand(9, 12) < 0.3, torch.rand(4, 9) < 0.5]
    sparse = sparsekern.sparsify(model)
    for m, mask in zip((sparse[0], sparse[2]), masks):
        m.set_mask(mask)
    want = sparse(x)
    compact = sparsekern.sparsify(_model(), storage="compact")
    compact.load_state_dict(sparse.state_dict())
    assert isinstance(compact[0], CompactSparseLinear)
    assert compact[0].values.shape == (int(masks[0].sum()),)
    assert (
        sum(p.numel() for p in compact.parameters())
        == int(masks[0].sum()) + int(masks[1].sum()) + 9 + 4
    )
    torch.testing.assert_close(compact(x), want)
    compact(x).sum().backward()
    assert compact[0].values.grad.shape == compact[0].values.shape
    assert [e.path for e in execution_plan(compact)] == ["reference", "reference"]  # tiny


def test_state_dict_round_trips_dense_keys():
    sparse = sparsekern.sparsify(_model())
    sparse[0].set_mask(torch.rand(9, 12) < 0.4)
    compact = sparsekern.sparsify(_model(), storage="compact")
    compact.load_state_dict(sparse.state_dict())
    sd = compact.state_dict()
    assert set(sd) == set(sparse.state_dict())
    for k, v in sparse.state_dict().items():
        assert torch.equal(sd[k], v), k
    plain = _model()
    plain.load_state_dict({k: v for k, v in sd.items() if not k.endswith("mask")})
    torch.testing.assert_close(plain(torch.ones(2, 12)), compact(torch.ones(2, 12)))
    fresh = sparsekern.sparsify(_model(), storage="compact")
    fresh.load_state_dict(plain.state_dict())  # a dense checkpoint: masks all True
    assert fresh[0].values.numel() == 9 * 12 and bool(fresh[0].mask.all())
    bad = dict(sd)
    bad["0.mask"] = sd["0.mask"].float()
    with pytest.raises(RuntimeError, match="expected a torch.bool mask"):
        fresh.load_state_dict(bad)


def test_set_mask_repacks_values_and_adam_state():
    torch.manual_seed(3)
    layer = CompactSparseLinear.from_dense(nn.Linear(10, 6))
    twin = SparseLinear.from_dense(nn.Linear(10, 6))
    with torch.no_grad():
        twin.weight.copy_(layer.weight)
        twin.bias.copy_(layer.bias)
    opt_c = torch.optim.Adam(layer.parameters(), lr=1e-2)
    opt_d = torch.optim.Adam(twin.parameters(), lr=1e-2)
    x = torch.randn(7, 10)
    for step in range(6):
        if step in (2, 4):  # prune, then regrow some: state must follow the entries
            mask = torch.rand(6, 10) < 0.6
            set_mask(layer, mask, opt_c)
            set_mask(twin, mask, opt_d)
        for m, o in ((layer, opt_c), (twin, opt_d)):
            o.zero_grad()
            (m(x) ** 2).sum().backward()
            o.step()
        torch.testing.assert_close(layer.weight, twin.weight.detach())
    st_c, st_d = opt_c.state[layer.values], opt_d.state[twin.weight]
    idx = layer.index
    torch.testing.assert_close(st_c["exp_avg_sq"], st_d["exp_avg_sq"].reshape(-1)[idx.flat_idx])
    assert st_c["exp_avg"].shape == layer.values.shape


def test_in_place_mask_edit_is_seen_and_bad_input_refused():
    layer = CompactSparseLinear(5, 3)
    x = torch.randn(2, 5)
    layer.mask[0] = False
    got = layer(x)
    assert layer.values.numel() == 10
    torch.testing.assert_close(
        got, sparse_linear_reference(x, layer.weight, layer.mask, layer.bias.detach())
    )
    with pytest.raises(ValueError, match=r"expected shape \[3, 5\], got \[5, 3\]"):
        layer.set_mask(torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected storage 'dense' or 'compact', got 'csr'"):
        sparsekern.sparsify(_model(), storage="csr")
    with pytest.raises(TypeError, match="expected an nn.Module, got NoneType"):
        sparsekern.sparsify(None)
