"""CSRLinear / CSRConv2d: outputs equal the masked layers' (float64 references), gradients by name,
every conv geometry (stride, dilation, padding modes, 'same', unbatched), the dense fallback above
``dense_above``, the state dict (any nnz, weights_only, refused loads leave the layer), deepcopy,
pickle, torch.compile."""

import copy
import importlib
import io
import pickle

import pytest
import torch
from torch import nn

from sparsekern.formats.csr import CSRMatrix
from sparsekern.nn import SparseConv2d, SparseLinear, set_mask
from sparsekern.nn.csr_layers import CSRConv2d, CSRLinear

cl = importlib.import_module("sparsekern.ops.csr_linear")


def _sparse_linear(fin, fout, density, device, bias=True):
    layer = SparseLinear(fin, fout, bias=bias).to(device)
    set_mask(layer, torch.rand(fout, fin, device=device) < density)
    return layer


def _sparse_conv(density, device, **kw):
    conv = SparseConv2d(6, 7, 3, **kw).to(device)
    set_mask(conv, torch.rand(conv.weight.shape, device=device) < density)
    return conv


@pytest.mark.parametrize("density", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_linear_matches_masked_layer(density, rows, device):
    ref = _sparse_linear(53, 37, density, device)
    csr = CSRLinear.from_sparse(ref)
    assert csr.nnz == int(ref.mask.sum()) and csr.col_idx.dtype == torch.int16
    x = torch.randn(2, rows, 53, device=device)
    with torch.no_grad():
        torch.testing.assert_close(csr(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(csr.to_dense(), ref.weight * ref.mask)


def test_linear_plain_cpu_path_matches_and_skips_autograd(monkeypatch):
    """No gradient wanted on the CPU: torch's CSR product directly (no autograd Function)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ref = _sparse_linear(53, 37, 0.2, "cpu")
    csr = CSRLinear.from_sparse(ref)
    called = []
    monkeypatch.setattr(cl._CSRLinearFunction, "apply", lambda *a: called.append(1))
    for rows in (1, 6):
        x = torch.randn(rows, 53)
        with torch.no_grad():
            y = csr(x)
            torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
        assert y.t().is_contiguous()  # torch's CSR product's layout (W @ x^T), no copy
    assert not called


def test_cached_products_follow_in_place_index_edits(monkeypatch):
    """The torch CSR tensor and the dense weight are cached on ``values``; an in-place edit of
    the index buffers alone (values untouched) must still rebuild them."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = SparseLinear(20, 6)
    set_mask(layer, torch.eye(6, 20, dtype=torch.bool))  # one entry per row, at column r
    csr = CSRLinear.from_sparse(layer, dense_above=4)
    x_small, x_big = torch.randn(2, 20), torch.randn(8, 20)  # the CSR path, the dense path
    with torch.no_grad():
        csr(x_small), csr(x_big)  # both cached
        csr.col_idx.add_(1)  # row r's entry moves to column r + 1
        w = csr.weight.to_dense()
        assert w[0, 1] != 0 and w[0, 0] == 0
        for x in (x_small, x_big):
            y = csr(x)
            torch.testing.assert_close(y, x @ w.t() + csr.bias, rtol=1e-5, atol=1e-5)


def test_linear_gradients_by_name(device):
    ref = _sparse_linear(30, 20, 0.3, device)
    csr = CSRLinear.from_sparse(ref)
    x = torch.randn(4, 30, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    dy = torch.randn(4, 20, device=device)
    csr(x).backward(dy)
    ref(x2).backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(csr.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    kept = ref.mask.nonzero(as_tuple=True)
    torch.testing.assert_close(csr.values.grad, ref.weight.grad[kept], rtol=1e-5, atol=1e-5)


def test_dense_above_runs_dense_and_caches_the_weight(device):
    ref = _sparse_linear(30, 20, 0.3, device)
    csr = CSRLinear.from_sparse(ref, dense_above=2)
    with torch.no_grad():
        x = torch.randn(3, 30, device=device)
        torch.testing.assert_close(csr(x), ref(x), rtol=1e-5, atol=1e-5)
        w1 = csr._dense_weight()
        assert csr._dense_weight() is w1  # cached
        csr.values.mul_(2)  # an in-place change is seen
        torch.testing.assert_close(csr(x), nn.functional.linear(x, 2 * ref.weight, ref.bias))
    loaded = pickle.loads(pickle.dumps(csr))  # the cache stays with the original's values
    with torch.no_grad():
        assert loaded._dense_weight() is not csr._dense_weight()
        torch.testing.assert_close(loaded._dense_weight(), csr._dense_weight())
    with pytest.raises(ValueError, match="dense_above: expected None or an int >= 0, got -1"):
        CSRLinear.from_sparse(ref, dense_above=-1)


def test_decode_rows_run_the_kernel_where_kernels_run(device, monkeypatch):
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    orig = cl.csr_linear_launch
    monkeypatch.setattr(cl, "csr_linear_launch", lambda *a, **k: calls.append(1) or orig(*a, **k))
    csr = CSRLinear.from_sparse(_sparse_linear(30, 20, 0.3, device))
    with torch.no_grad():
        csr(torch.randn(2, 30, device=device))
    assert calls == [1]


def test_state_dict_any_nnz_weights_only_and_refusals(device):
    a = CSRLinear.from_sparse(_sparse_linear(30, 20, 0.3, device), dense_above=7)
    b = CSRLinear.from_sparse(_sparse_linear(30, 20, 0.6, device))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd) == {"values", "row_ptr", "col_idx", "bias", "_extra_state"}
    b.load_state_dict(sd)
    assert b.nnz == a.nnz and b.dense_above == 7
    x = torch.randn(3, 30, device=device)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    before = b.values.detach().clone()
    bad = dict(sd)
    bad["col_idx"] = sd["col_idx"].flip(0)
    with pytest.raises(RuntimeError, match="strictly increasing columns"):
        b.load_state_dict(bad)
    bad = dict(sd)
    bad["_extra_state"] = {**sd["_extra_state"], "shape": [21, 30]}
    with pytest.raises(RuntimeError, match=r"expected shape \(20, 30\), got \(21, 30\)"):
        b.load_state_dict(bad)
    assert torch.equal(b.values, before)
    empty = CSRLinear.empty_like(nn.Linear(30, 20).to(device))
    assert empty.nnz == 0
    empty.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(empty(x), a(x), rtol=0, atol=0)


def test_deepcopy_pickle_cast(device):
    csr = CSRLinear.from_sparse(_sparse_linear(30, 20, 0.3, device))
    x = torch.randn(3, 30, device=device)
    with torch.no_grad():
        y = csr(x)
        torch.testing.assert_close(copy.deepcopy(csr)(x), y, rtol=0, atol=0)
        torch.testing.assert_close(pickle.loads(pickle.dumps(csr))(x), y, rtol=0, atol=0)
        d = copy.deepcopy(csr).double()
        assert d.values.dtype == torch.float64 and d.col_idx.dtype == torch.int16
        torch.testing.assert_close(d(x.double()), y.double(), rtol=1e-5, atol=1e-5)
    assert "nnz=" in repr(csr) and "dense_above=None" in repr(csr)


CONVS = {
    "plain": {},
    "pad_stride": {"padding": 1, "stride": 2},
    "dilation": {"padding": 2, "dilation": 2},
    "same": {"padding": "same"},
    "reflect": {"padding": 1, "padding_mode": "reflect"},
    "circular": {"padding": (1, 2), "padding_mode": "circular"},
}


@pytest.mark.parametrize("geometry", list(CONVS))
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_conv_matches_masked_conv(geometry, density, device):
    ref = _sparse_conv(density, device, **CONVS[geometry])
    csr = CSRConv2d.from_sparse(ref)
    x = torch.randn(2, 6, 9, 8, device=device)
    with torch.no_grad():
        y = csr(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(csr(x[0]), ref(x[0]), rtol=1e-5, atol=1e-5)  # unbatched
    assert y.is_contiguous()
    torch.testing.assert_close(csr.to_dense(), ref.weight * ref.mask)


def test_conv_gradients_dense_above_and_state_dict(device):
    ref = _sparse_conv(0.3, device, padding=1)
    csr = CSRConv2d.from_sparse(ref)
    x = torch.randn(2, 6, 7, 7, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    dy = torch.randn(2, 7, 7, 7, device=device)
    csr(x).backward(dy)
    ref(x2).backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    kept = ref.mask.reshape(7, -1).nonzero(as_tuple=True)
    torch.testing.assert_close(
        csr.values.grad, ref.weight.grad.reshape(7, -1)[kept], rtol=1e-4, atol=1e-5
    )
    other = CSRConv2d.empty_like(ref)
    other.load_state_dict(csr.state_dict())
    other.dense_above = 1
    with torch.no_grad():
        torch.testing.assert_close(other(x), ref(x), rtol=1e-5, atol=1e-5)  # dense at 2 images
    bad = csr.state_dict()
    bad["_extra_state"] = {**bad["_extra_state"], "stride": [2, 2]}
    with pytest.raises(RuntimeError, match=r"expected stride \(1, 1\), got \(2, 2\)"):
        other.load_state_dict(bad)


def test_conv_errors(device):
    grouped = SparseConv2d(4, 4, 3, groups=2).to(device)
    with pytest.raises(TypeError, match="groups=1"):
        CSRConv2d.from_sparse(grouped)
    csr = CSRConv2d.from_sparse(_sparse_conv(0.3, device))
    with pytest.raises(ValueError, match=r"expected input \[N, 6, H, W\] or \[6, H, W\], got"):
        csr(torch.randn(2, 5, 8, 8, device=device))
    with pytest.raises(ValueError, match="smaller than the"):
        csr(torch.randn(1, 6, 2, 2, device=device))
    m = CSRMatrix.from_dense(torch.ones(7, 10, device=device))
    with pytest.raises(ValueError, match=r"expected the GEMM view of shape \(7, 54\)"):
        CSRConv2d(m, (7, 6, 3, 3))
    with pytest.raises(TypeError, match="weight must be a CSRMatrix, got Tensor"):
        CSRLinear(torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"expected bias of shape \[7\], got \[3\]"):
        CSRLinear(m, torch.ones(3, device=device))


def test_compile_fullgraph_model_of_csr_layers(device):
    torch._dynamo.reset()
    model = nn.Sequential(
        CSRLinear.from_sparse(_sparse_linear(20, 30, 0.3, device)),
        nn.ReLU(),
        CSRLinear.from_sparse(_sparse_linear(30, 5, 0.5, device)),
    )
    x = torch.randn(3, 20, device=device)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
