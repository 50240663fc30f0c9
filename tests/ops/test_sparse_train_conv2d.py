"""sparse_conv2d (kept weights only: forward, dX, dW) against its float64 plain-PyTorch twin, with
the C++ kernels and with the fallback; SparseConv2d's choice of path."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import SparseConv2d, execution_plan, set_mask
from sparsekern.nn.sparse_conv2d import SPARSE_CONV_MAX_KEPT
from sparsekern.ops.sparse_train import conv2d as op
from sparsekern.ops.sparse_train.conv2d import sparse_conv2d
from sparsekern.ops.sparse_train.conv2d_reference import sparse_conv2d_reference

# (N, C_in, C_out, H, W, k, stride, padding, dilation): odd sizes, channels off 8/16, batches
# that exercise 1, 2, 3 and 4+1 vectors of 16 lanes.
CONFIGS = [
    (3, 5, 7, 9, 11, 3, 1, 1, 1),
    (5, 6, 4, 10, 7, 3, 2, 1, 1),
    (17, 3, 5, 8, 9, 1, 1, 0, 1),
    (33, 4, 6, 7, 9, 3, 2, 0, 2),
    (2, 7, 3, 6, 5, 5, 1, 2, 1),
    (80, 3, 2, 5, 6, 3, 3, 2, 1),
    (1, 9, 3, 5, 4, (3, 1), (1, 2), (1, 0), (2, 1)),
]
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


@pytest.fixture(params=["ext", "fallback"])
def backend(request, monkeypatch):
    if request.param == "ext":
        if not op.extension_available():
            pytest.skip("the C++ extension cannot be built here")
    else:
        monkeypatch.setattr(op, "_ext", lambda: None)
    return request.param


def _case(cfg, density, dtype, seed=0):
    n, cin, cout, h, w, k, s, p, d = cfg
    g = torch.Generator().manual_seed(seed)
    kh, kw = _pair(k)
    x = torch.randn(n, cin, h, w, generator=g).to(dtype)
    mask = torch.rand(cout, cin, kh, kw, generator=g) < density
    weight = (torch.randn(cout, cin, kh, kw, generator=g) * mask).to(dtype)
    bias = torch.randn(cout, generator=g).to(dtype)
    return x, weight, mask, bias, (_pair(s), _pair(p), _pair(d))


def _grads(fn, x, weight, bias, gy=None):
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    y = fn(x, weight, bias)
    gy = torch.randn_like(y) if gy is None else gy.to(y.dtype)
    y.backward(gy)
    return y, {"x": x.grad, "weight": weight.grad, "bias": bias.grad}, gy


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_matches_float64_twin_every_gradient(cfg, density, backend):
    x, weight, mask, bias, conv = _case(cfg, density, torch.float32)
    y64, g64, gy = _grads(
        lambda a, b, c: sparse_conv2d_reference(a, b, mask, c, *conv),
        x.double(), weight.double(), bias.double(),
    )  # fmt: skip
    y, g, _ = _grads(lambda a, b, c: sparse_conv2d(a, b, mask, c, *conv), x, weight, bias, gy)
    torch.testing.assert_close(y.double(), y64, atol=TOL[torch.float32], rtol=1e-4)
    for name in ("x", "weight", "bias"):
        torch.testing.assert_close(
            g[name].double(), g64[name], atol=TOL[torch.float32] * 10, rtol=1e-4, msg=name
        )
    assert bool((g["weight"][~mask] == 0).all()), "dW must be exactly zero at pruned weights"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_every_gradient(dtype, backend):
    x, weight, mask, bias, conv = _case((6, 5, 7, 7, 9, 3, 1, 1, 1), 0.4, dtype)
    y64, g64, gy = _grads(
        lambda a, b, c: sparse_conv2d_reference(a, b, mask, c, *conv),
        x.double(), weight.double(), bias.double(),
    )  # fmt: skip
    y, g, _ = _grads(lambda a, b, c: sparse_conv2d(a, b, mask, c, *conv), x, weight, bias, gy)
    assert y.dtype == dtype and all(t.dtype == dtype for t in g.values())
    scale = y64.abs().max()
    torch.testing.assert_close(y.double() / scale, y64 / scale, atol=TOL[dtype], rtol=0)
    for name in ("x", "weight", "bias"):
        s = g64[name].abs().max()
        torch.testing.assert_close(
            g[name].double() / s, g64[name] / s, atol=TOL[dtype], rtol=0, msg=name
        )
    assert bool((g["weight"][~mask] == 0).all())


def test_pruned_weights_are_never_read():
    if not op.extension_available():
        pytest.skip("the C++ extension cannot be built here")
    x, weight, mask, bias, conv = _case((4, 6, 5, 6, 6, 3, 1, 1, 1), 0.5, torch.float32)
    poisoned = weight.masked_fill(~mask, float("nan"))
    y, g, gy = _grads(lambda a, b, c: sparse_conv2d(a, b, mask, c, *conv), x, poisoned, bias)
    y_ref, g_ref, _ = _grads(lambda a, b, c: F.conv2d(a, b, c, *conv), x, weight, bias, gy)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g["x"], g_ref["x"], atol=1e-4, rtol=1e-4)
    assert bool(torch.isfinite(g["weight"]).all())


def test_index_follows_in_place_mask_edits():
    x, weight, mask, bias, conv = _case((4, 6, 5, 6, 6, 3, 1, 1, 1), 0.6, torch.float32)
    first = sparse_conv2d(x, weight, mask, bias, *conv)
    mask[:, :3] = False  # in place: bumps the version counter
    w2 = weight * mask
    got = sparse_conv2d(x, w2, mask, bias, *conv)
    torch.testing.assert_close(got, F.conv2d(x, w2, bias, *conv), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, first)


def test_double_backward_runs_the_twin():
    x, weight, mask, bias, conv = _case((3, 4, 5, 6, 6, 3, 1, 1, 1), 0.5, torch.float32)
    outs = []
    for fn in (sparse_conv2d, sparse_conv2d_reference):
        xx, ww = x.clone().requires_grad_(), weight.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(xx, ww, mask, bias, *conv).square().sum(), xx,
                                    create_graph=True)  # fmt: skip
        gx.square().sum().backward()
        outs.append((gx.detach(), ww.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-2, rtol=1e-4)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: {**a, "x": a["x"][0]}, ValueError, "rank 4"),
        (lambda a: {**a, "mask": a["mask"].float()}, ValueError, "bool mask"),
        (lambda a: {**a, "x": a["x"][:, :2]}, ValueError, "C_in = 3"),
        (lambda a: {**a, "x": a["x"].double()}, TypeError, "floating dtype"),
        (lambda a: {**a, "bias": a["bias"][:1]}, ValueError, r"\[4\] \(C_out\), got \[1\]"),
        (lambda a: {**a, "bias": a["bias"].double()}, TypeError, "expected bias as torch.float32"),
        (lambda a: {**a, "stride": (0, 1)}, ValueError, "stride as a pair"),
        (lambda a: {**a, "x": a["x"][..., :1, :1]}, ValueError, "kernel's size"),
    ],
)
def test_validation_names_expected_and_got(change, error, message):
    args = {
        "x": torch.randn(2, 3, 5, 5),
        "weight": torch.randn(4, 3, 3, 3),
        "mask": torch.ones(4, 3, 3, 3, dtype=torch.bool),
        "bias": torch.randn(4),
        "stride": (1, 1),
        "padding": (0, 0),
        "dilation": (1, 1),
    }
    with pytest.raises(error, match=message):
        sparse_conv2d(**change(args))


def _layer(cin, cout, kept, seed=0, **kw):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1, **kw)
    layer = SparseConv2d.from_dense(conv)
    set_mask(layer, torch.rand(layer.weight.shape) < kept)
    return layer


def test_module_picks_sparse_at_low_density_and_matches_nn_conv2d():
    layer = _layer(16, 16, SPARSE_CONV_MAX_KEPT / 2)
    dense = nn.Conv2d(16, 16, 3, padding=1)
    dense.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    x = torch.randn(16, 16, 7, 9)
    choice = layer.execution_path(tuple(x.shape))
    expected = "sparse" if op.extension_available() else "masked"
    assert choice.path == expected, choice.why
    y, yd = layer(x), dense(x)
    torch.testing.assert_close(y, yd, atol=1e-4, rtol=1e-4)
    gy = torch.randn_like(y)
    y.backward(gy)
    yd.backward(gy)
    torch.testing.assert_close(layer.weight.grad, dense.weight.grad * layer.mask, atol=1e-3,
                               rtol=1e-4)  # fmt: skip
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, atol=1e-3, rtol=1e-4)
    assert bool((layer.weight.grad[~layer.mask] == 0).all())
    (entry,) = execution_plan(layer)
    assert entry.path == expected and entry.input_shape == tuple(x.shape)


def test_module_rule_keeps_the_vendor_path_where_sparse_does_not_pay():
    x = torch.randn(16, 16, 6, 6)
    assert _layer(16, 16, 0.5).execution_path(tuple(x.shape)).path == "masked"
    grouped = _layer(16, 16, 0.02, groups=2)
    assert grouped.execution_path(tuple(x.shape)).path == "masked"
    assert "groups=2" in grouped.execution_path(tuple(x.shape)).why
    small_batch = _layer(16, 16, 0.02)
    assert small_batch.execution_path((1, 16, 6, 6)).path == "masked"  # 1 of 16 lanes used
    with torch.no_grad():
        assert small_batch.execution_path(tuple(x.shape)).path == "dense"
    stem = _layer(3, 16, 0.02)
    assert stem.execution_path((16, 3, 6, 6)).path == "masked"


def test_module_sparse_path_with_padding_modes_and_unbatched():
    for mode in ("reflect", "zeros"):
        torch.manual_seed(1)
        conv = nn.Conv2d(16, 17, 3, padding=1, stride=2, padding_mode=mode)
        layer = SparseConv2d.from_dense(conv, torch.rand(conv.weight.shape) < 0.04)
        x = torch.randn(32, 16, 9, 8)
        torch.testing.assert_close(layer(x), conv(x), atol=1e-4, rtol=1e-4)
    x1 = torch.randn(16, 9, 8)
    torch.testing.assert_close(layer(x1), conv(x1), atol=1e-4, rtol=1e-4)


def test_module_without_the_extension_says_so_and_stays_exact(monkeypatch):
    monkeypatch.setattr(op, "_ext", lambda: None)
    layer = _layer(16, 16, 0.03)
    x = torch.randn(16, 16, 6, 6)
    choice = layer.execution_path(tuple(x.shape))
    assert choice.path == "masked" and "extension is unavailable" in choice.why
    ref = sparse_conv2d_reference(x, layer.weight, layer.mask, layer.bias, (1, 1), (1, 1))
    torch.testing.assert_close(layer(x), ref)


def test_compiled_module_runs_the_vendor_path():
    layer = _layer(16, 16, 0.03)
    x = torch.randn(16, 16, 6, 6)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), atol=1e-4, rtol=1e-4)


def test_float64_keeps_its_precision():
    x, weight, mask, bias, conv = _case((3, 4, 5, 6, 6, 3, 1, 1, 1), 0.5, torch.float64)
    y = sparse_conv2d(x, weight, mask, bias, *conv)
    torch.testing.assert_close(y, sparse_conv2d_reference(x, weight, mask, bias, *conv),
                               atol=1e-12, rtol=1e-12)  # fmt: skip
    layer = _layer(16, 16, 0.03).double()
    assert "dtype torch.float64" in layer.execution_path((16, 16, 6, 6)).why
