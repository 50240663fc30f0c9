"""masked_linear: the Triton kernels (through the interpreter on CPU) against a float64 reference.

Every case draws fresh random inputs, uses sizes that are not multiples of the tiles, masks of
density 0, 1 and in between, and checks y, dx, dweight and dbias by name."""

import importlib
import math

import pytest
import torch

from sparsekern.ops import masked_linear
from sparsekern.ops._dispatch import use_kernels

# The module, not the function of the same name that sparsekern.ops exports.
ml = importlib.import_module("sparsekern.ops.masked_linear")

# Per-dtype tolerance: (rtol, atol per sqrt(reduction length)). Inputs are rounded to the dtype
# first and the float64 reference is computed from the rounded values, so what remains is fp32
# accumulation and the final rounding (bf16: 2^-8, and the interpreter truncates: 2^-7).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = list(TOL)
# (leading batch shape, in_features K, out_features N): odd sizes, none a multiple of the tiles.
SHAPES = [
    ((1,), 1, 1),
    ((7,), 100, 33),
    ((33,), 7, 100),
    ((100,), 33, 257),
    ((2, 3, 5), 40, 17),
]
DENSITIES = [0.0, 0.37, 1.0]


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, reduce_len: int, name: str):
    rtol, atol = TOL[dtype]
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(
        got.double(),
        ref,
        rtol=rtol,
        atol=atol * math.sqrt(max(reduce_len, 1)),
        msg=lambda m: f"{name}: {m}",
    )


def _make(batch, K, N, density, dtype, device, bias=True):
    x = torch.randn(*batch, K, device=device).to(dtype)
    w = torch.randn(N, K, device=device).to(dtype)
    mask = torch.rand(N, K, device=device) < density
    if density == 1.0:
        mask[:] = True
    b = torch.randn(N, device=device).to(dtype) if bias else None
    return x, w, mask, b


def _reference(x, w, mask, b, dy):
    """float64 forward and gradients of y = x (w*mask)^T + b, by torch's autograd."""
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if b is not None else None
    yr = torch.nn.functional.linear(xr, wr * mask, br)
    yr.backward(dy.double())
    return yr.detach(), xr.grad, wr.grad, (br.grad if br is not None else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("batch,K,N", SHAPES)
def test_forward_and_gradients(batch, K, N, density, dtype, device):
    x, w, mask, b = _make(batch, K, N, density, dtype, device)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    y = masked_linear(x, w, mask, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, dbr = _reference(x, w, mask, b, dy)
    M = math.prod(batch)
    _close(y, yr, dtype, K, "y")
    _close(x.grad, dxr, dtype, N, "dx")
    _close(w.grad, dwr, dtype, M, "dweight")
    _close(b.grad, dbr, dtype, M, "dbias")
    assert y.shape == (*batch, N)
    # dweight must be exactly zero at pruned weights, not merely small.
    assert (w.grad[~mask] == 0).all(), "dweight nonzero at pruned entries"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_bias_and_partial_grads(dtype, device):
    x, w, mask, _ = _make((19,), 45, 23, 0.5, dtype, device, bias=False)
    w.requires_grad_()  # x needs no grad: only dW is computed
    y = masked_linear(x, w, mask)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, _, dwr, _ = _reference(x, w, mask, None, dy)
    _close(y, yr, dtype, 45, "y")
    _close(w.grad, dwr, dtype, 19, "dweight")
    assert x.grad is None


def test_non_contiguous_operands(device):
    dtype = torch.float32
    xt = torch.randn(40, 13, device=device)  # x = xt.T is [13, 40], column-major
    wt = torch.randn(40, 21, device=device)  # weight = wt.T is [21, 40], column-major
    x, w = xt.t().requires_grad_(), wt.t().detach().requires_grad_()
    mask = (torch.rand(40, 21, device=device) < 0.5).t()
    y = masked_linear(x, w, mask)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, _ = _reference(x, w, mask, None, dy)
    _close(y, yr, dtype, 40, "y")
    _close(x.grad, dxr, dtype, 21, "dx")
    _close(w.grad, dwr, dtype, 13, "dweight")


@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_launchers_write_every_element(density, device):
    """Outputs poisoned with NaN before the launch: any element a kernel fails to write shows."""
    if not use_kernels(torch.empty(0, device=device)):
        pytest.skip("kernels not in use on this device")
    M, N, K = 37, 50, 70
    x, w, mask, b = _make((M,), K, N, density, torch.float32, device)
    dy = torch.randn(M, N, device=device)
    y = ml.masked_linear_fwd_launch(x, w, mask, b, out=torch.full((M, N), math.nan, device=device))
    dx = ml.masked_linear_dx_launch(dy, w, mask, out=torch.full((M, K), math.nan, device=device))
    dw = ml.masked_linear_dw_launch(dy, x, mask, out=torch.full((N, K), math.nan, device=device))
    wm = w.double() * mask
    _close(y, x.double() @ wm.t() + b.double(), torch.float32, K, "y")
    _close(dx, dy.double() @ wm, torch.float32, N, "dx")
    _close(dw, (dy.double().t() @ x.double()) * mask, torch.float32, M, "dweight")


def test_dweight_skips_pruned_tiles_exactly(device):
    """A block-structured mask: whole 16x16 flag blocks pruned, including ones that straddle the
    32-wide interpreter tiles and the ragged edge. dW is exact zero there, right elsewhere."""
    N, K, M = 70, 90, 29
    mask = torch.ones(N, K, dtype=torch.bool, device=device)
    mask[:32, :64] = False  # tiles fully pruned
    mask[48:, 80:] = False  # ragged corner tile
    mask[40:56, 16:48] = False  # flag blocks inside kept tiles
    x = torch.randn(M, K, device=device)
    dy = torch.randn(M, N, device=device)
    flags = ml.tile_flags(mask)
    assert flags.shape == (5, 6)
    assert flags[:2, :4].eq(0).all() and flags[2:, 4:].gt(0).any()
    dw = ml._dw_impl(dy, x, mask)
    _close(dw, (dy.double().t() @ x.double()) * mask, torch.float32, M, "dweight")
    assert (dw[~mask] == 0).all()


def test_tile_flags_cache_follows_in_place_changes(device):
    mask = torch.ones(40, 40, dtype=torch.bool, device=device)
    f1 = ml.tile_flags(mask)
    assert ml.tile_flags(mask) is f1, "flags recomputed although the mask did not change"
    mask[:16, :16] = False  # in-place change bumps mask._version
    f2 = ml.tile_flags(mask)
    assert f2 is not f1 and f2[0, 0] == 0 and f2[1, 1] == 1


def test_interpreter_runs_kernels_not_reference(monkeypatch, device):
    """Under TRITON_INTERPRET=1 (or on CUDA) the Triton kernels must run, not the twin."""
    if not use_kernels(torch.empty(0, device=device)):
        pytest.skip("kernels not in use on this device")

    def boom(*a, **k):
        raise AssertionError("reference path used")

    for name in ("masked_linear_reference", "_ref_dx", "_ref_dw"):
        monkeypatch.setattr(ml, name, boom)
    x, w, mask, b = _make((9,), 20, 11, 0.5, torch.float32, device)
    w.requires_grad_()
    x.requires_grad_()
    masked_linear(x, w, mask, b).sum().backward()


@pytest.mark.parametrize("density", DENSITIES)
def test_cpu_reference_path(density, monkeypatch):
    """The CPU path without the interpreter: the twin, its saved W*M and cached float mask."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, mask, b = _make((4, 9), 37, 21, density, torch.float32, torch.device("cpu"))
    for t in (x, w, b):
        t.requires_grad_()
    for step in range(2):  # the second step reuses the cached float mask; then the mask changes
        y = masked_linear(x, w, mask, b)
        dy = torch.randn_like(y)
        for t in (x, w, b):
            t.grad = None
        y.backward(dy)
        yr, dxr, dwr, dbr = _reference(x, w, mask, b, dy)
        for got, ref, n, name in (
            (y, yr, 37, "y"),
            (x.grad, dxr, 21, "dx"),
            (w.grad, dwr, 36, "dw"),
        ):
            _close(got, ref, torch.float32, n, name)
        _close(b.grad, dbr, torch.float32, 36, "dbias")
        assert (w.grad[~mask] == 0).all()
        mask[step::3, ::2] = ~mask[step::3, ::2]  # in place: the cache must notice


def test_float64_runs_reference_and_passes_gradcheck():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 6) < 0.5
    assert torch.autograd.gradcheck(lambda x, w, b: masked_linear(x, w, mask, b), (x, w, b))


def test_autocast_casts_like_linear(device):
    x = torch.randn(8, 24, device=device)
    w = torch.randn(12, 24, device=device, requires_grad=True)
    mask = torch.rand(12, 24, device=device) < 0.5
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = masked_linear(x, w, mask)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and (w.grad[~mask] == 0).all()


def test_empty_batch(device):
    x = torch.randn(0, 10, device=device, requires_grad=True)
    w = torch.randn(5, 10, device=device, requires_grad=True)
    mask = torch.ones(5, 10, dtype=torch.bool, device=device)
    y = masked_linear(x, w, mask)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert (w.grad == 0).all()


# --- bad input: clear errors naming what was expected and what came ------------------------------
@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("mask_shape", ValueError, r"mask must have the weight's shape \(4, 6\), got \(6, 4\)"),
        ("mask_dtype", TypeError, r"mask must be torch.bool, got torch.float32"),
        ("device", ValueError, r"one device, got x on cpu, weight on meta"),
        ("weight_rank", ValueError, r"weight must be 2-D .* got shape \(24,\)"),
        ("x_int", TypeError, r"x must be a floating-point tensor, got torch.int64"),
        ("x_features", ValueError, r"weight.shape\[1\] = 6, got x shape \(3, 5\)"),
        ("bias_shape", ValueError, r"bias must have shape \(4,\), got \(6,\)"),
        ("dtype_mix", TypeError, r"x torch.float16, weight torch.float32"),
    ],
)
def test_bad_input_raises(case, exc, match):
    x, w, mask, b = torch.randn(3, 6), torch.randn(4, 6), torch.ones(4, 6, dtype=torch.bool), None
    if case == "mask_shape":
        mask = torch.ones(6, 4, dtype=torch.bool)
    elif case == "mask_dtype":
        mask = torch.ones(4, 6)
    elif case == "device":
        w = torch.randn(4, 6, device="meta")
    elif case == "weight_rank":
        w = torch.randn(24)
    elif case == "x_int":
        x = torch.ones(3, 6, dtype=torch.long)
    elif case == "x_features":
        x = torch.randn(3, 5)
    elif case == "bias_shape":
        b = torch.randn(6)
    elif case == "dtype_mix":
        x = x.half()
    with pytest.raises(exc, match=match):
        masked_linear(x, w, mask, b)


def test_compile_fullgraph_model_of_sparse_linear(device):
    """torch.compile(fullgraph=True) traces SparseLinear layers through the custom ops."""
    from sparsekern.nn import SparseLinear

    torch._dynamo.reset()
    model = torch.nn.Sequential(SparseLinear(20, 30), torch.nn.ReLU(), SparseLinear(30, 5)).to(
        device
    )
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.mask.copy_(torch.rand_like(layer.weight) < 0.5)
    x = torch.randn(7, 20, device=device)
    ref = model(x)
    ref.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)
    assert (model[0].weight.grad[~model[0].mask] == 0).all()


# --- GPU only: target sizes and 64-bit offsets ----------------------------------------------------
@pytest.mark.gpu
def test_gpu_target_size_bf16():
    M, N, K = 8192, 4096, 4096
    dev = torch.device("cuda")
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.rand(N, K, device=dev) < 0.1
    y = masked_linear(x, w, mask)
    dy = torch.randn_like(y)
    y.backward(dy)
    wm = w.detach().float() * mask
    torch.testing.assert_close(y.float(), x.detach().float() @ wm.t(), rtol=2e-2, atol=2e-2 * 64)
    torch.testing.assert_close(x.grad.float(), dy.float() @ wm, rtol=2e-2, atol=2e-2 * 64)
    dwr = (dy.float().t() @ x.detach().float()) * mask
    torch.testing.assert_close(w.grad.float(), dwr, rtol=2e-2, atol=2e-2 * 91)
    assert (w.grad[~mask] == 0).all()


@pytest.mark.gpu
def test_gpu_offsets_beyond_int32():
    """x has 2^31 + 2^20 elements: row offsets past 2^31 must not wrap."""
    K, N = 4096, 32
    M = (2**31 + 2**20) // K
    dev = torch.device("cuda")
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    mask = torch.rand(N, K, device=dev) < 0.5
    y = ml.masked_linear_fwd_launch(x, w, mask)
    tail = slice(M - 300, M)
    ref = x[tail].float() @ (w.float() * mask).t()
    torch.testing.assert_close(y[tail].float(), ref, rtol=2e-2, atol=2e-2 * 64)
    dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    dx = ml.masked_linear_dx_launch(dy, w, mask)
    torch.testing.assert_close(
        dx[tail].float(), dy[tail].float() @ (w.float() * mask), rtol=2e-2, atol=2e-2 * 6
    )
    del dx, y
    dw = ml.masked_linear_dw_launch(dy, x, mask)
    dwr = (dy.float().t() @ x.float()) * mask
    torch.testing.assert_close(dw.float(), dwr, rtol=2e-2, atol=2e-2 * math.sqrt(M))
