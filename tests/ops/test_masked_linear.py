"""masked_linear against a float64 reference: the vendor path and the fused Triton dW kernel
(through the interpreter on CPU), exact mode and the modules' ``assume_pruned_zero`` mode.

Every case draws fresh random inputs, uses sizes that are not multiples of the tiles, masks of
density 0, 1 and in between, and checks y, dx, dweight and dbias by name."""

import importlib
import math

import pytest
import torch

from sparsekern.ops import dw_backend, masked_linear
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
BACKENDS = ["vendor", "kernel"]


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("batch,K,N", SHAPES)
def test_forward_and_gradients(batch, K, N, density, dtype, backend, device):
    x, w, mask, b = _make(batch, K, N, density, dtype, device)
    for t in (x, w, b):
        t.requires_grad_()
    with dw_backend(backend):
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_assume_pruned_zero_matches_exact_mode(dtype, backend, device):
    """The modules' mode: the weight is used as it is (it is zero at pruned entries)."""
    x, w, mask, b = _make((2, 9), 37, 21, 0.4, dtype, device)
    w = torch.where(mask, w, 0).requires_grad_()
    x.requires_grad_()
    with dw_backend(backend):
        y = masked_linear(x, w, mask, b, assume_pruned_zero=True)
        dy = torch.randn_like(y)
        y.backward(dy)
    yr, dxr, dwr, _ = _reference(x, w, mask, b, dy)
    _close(y, yr, dtype, 37, "y")
    _close(x.grad, dxr, dtype, 21, "dx")
    _close(w.grad, dwr, dtype, 18, "dweight")
    assert (w.grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_at_pruned_weights_are_ignored(backend, device):
    """Pruned entries do not exist: a NaN or inf there reaches neither y nor any gradient
    (``where`` semantics; ``W * M`` would give NaN * 0 = NaN)."""
    x, w, mask, b = _make((11,), 30, 17, 0.5, torch.float32, device)
    mask[0, :3] = False
    w[0, 0], w[0, 1], w[0, 2] = math.nan, math.inf, -math.inf
    w[~mask] = math.nan
    w.requires_grad_()
    x.requires_grad_()
    with dw_backend(backend):
        y = masked_linear(x, w, mask, b)
        y.backward(torch.ones_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(w.grad).all() and (w.grad[~mask] == 0).all()
    yr = torch.nn.functional.linear(x.double(), torch.where(mask, w, 0).double(), b.double())
    _close(y, yr, torch.float32, 30, "y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_bias_and_partial_grads(dtype, backend, device):
    x, w, mask, _ = _make((19,), 45, 23, 0.5, dtype, device, bias=False)
    w.requires_grad_()  # x needs no grad: only dW is computed
    with dw_backend(backend):
        y = masked_linear(x, w, mask)
        dy = torch.randn_like(y)
        y.backward(dy)
    yr, _, dwr, _ = _reference(x, w, mask, None, dy)
    _close(y, yr, dtype, 45, "y")
    _close(w.grad, dwr, dtype, 19, "dweight")
    assert x.grad is None


def test_frozen_weight_takes_the_vendor_op_directly(device):
    """No weight gradient to compute: no autograd node of ours, dx still right."""
    x, w, mask, b = _make((6,), 20, 9, 0.5, torch.float32, device)
    x.requires_grad_()
    y = masked_linear(x, w, mask, b)
    assert "MaskedWeight" not in type(y.grad_fn).__name__
    dy = torch.randn_like(y)
    y.backward(dy)
    _, dxr, _, _ = _reference(x, w, mask, b, dy)
    _close(x.grad, dxr, torch.float32, 9, "dx")
    with torch.no_grad():
        y2 = masked_linear(x, w, mask, b)
    assert y2.grad_fn is None
    _close(y2, _reference(x, w, mask, b, dy)[0], torch.float32, 20, "y under no_grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_reference(backend, device):
    """Gradient penalties and Hessian-vector products need the part of dW that flows through dx."""
    x, w, mask, b = _make((5,), 8, 6, 0.5, torch.float32, device)
    x.requires_grad_()
    w.requires_grad_()

    def penalty(fn):
        y = fn(x, w)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.square().sum(), w)
        return gw

    with dw_backend(backend):
        got = penalty(lambda x, w: masked_linear(x, w, mask, b))
    ref = penalty(lambda x, w: torch.nn.functional.linear(x, w * mask, b))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert (got[~mask] == 0).all()


def test_gradgradcheck_float64():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) < 0.5
    fn = lambda x, w, b: masked_linear(x, w, mask, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_dw_launcher_writes_every_element(density, device):
    """The fused dW's output poisoned with NaN before the launch: any element the kernel fails to
    write shows."""
    if not use_kernels(torch.empty(0, device=device)):
        pytest.skip("kernels not in use on this device")
    M, N, K = 37, 50, 70
    x, _, mask, _ = _make((M,), K, N, density, torch.float32, device)
    dy = torch.randn(M, N, device=device)
    dw = ml.masked_linear_dw_launch(dy, x, mask, out=torch.full((N, K), math.nan, device=device))
    _close(dw, (dy.double().t() @ x.double()) * mask, torch.float32, M, "dweight")


def test_dweight_kernel_skips_pruned_tiles_exactly(device):
    """A block-structured mask: whole 16x16 flag blocks pruned, including ones that straddle the
    32-wide interpreter tiles and the ragged edge. dW is exact zero there, right elsewhere."""
    if not use_kernels(torch.empty(0, device=device)):
        pytest.skip("kernels not in use on this device")
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
    dw = ml.masked_linear_dw_launch(dy, x, mask)
    _close(dw, (dy.double().t() @ x.double()) * mask, torch.float32, M, "dweight")
    assert (dw[~mask] == 0).all()


def test_auto_backend_takes_the_kernel_only_where_tiles_are_skipped(device):
    x = torch.randn(8, 512, device=device, dtype=torch.bfloat16)
    assert ml.dw_backend_for(x.float(), torch.zeros(256, 512, dtype=torch.bool)) == "vendor", (
        "true fp32 has no wgmma: always cuBLAS"
    )
    unstructured = torch.rand(256, 512, device=device) < 0.1
    assert ml.dw_backend_for(x, unstructured) == "vendor"
    rows = torch.zeros(256, 512, dtype=torch.bool, device=device)
    rows[:128] = torch.rand(128, 512, device=device) < 0.5  # half the 128-row tiles empty
    expected = "kernel" if use_kernels(x) else "vendor"
    assert ml.dw_backend_for(x, rows) == expected
    with dw_backend("vendor"):
        assert ml.dw_backend_for(x, rows) == "vendor"
    with (
        pytest.raises(ValueError, match=r"expected one of \('auto', 'vendor', 'kernel'\)"),
        dw_backend("cublas"),
    ):
        pass


def test_tile_flags_cache_follows_in_place_changes(device):
    mask = torch.ones(40, 40, dtype=torch.bool, device=device)
    f1 = ml.tile_flags(mask)
    assert ml.tile_flags(mask) is f1, "flags recomputed although the mask did not change"
    mask[:16, :16] = False  # in-place change bumps mask._version
    f2 = ml.tile_flags(mask)
    assert f2 is not f1 and f2[0, 0] == 0 and f2[1, 1] == 1


def test_kernel_backend_runs_the_triton_kernel(monkeypatch, device):
    """With the kernel backend on (CUDA, or the CPU under TRITON_INTERPRET=1), dW comes from the
    Triton launcher, not from the vendor GEMM."""
    if not use_kernels(torch.empty(0, device=device)):
        pytest.skip("kernels not in use on this device")
    calls = []
    real = ml.masked_linear_dw_launch
    monkeypatch.setattr(ml, "masked_linear_dw_launch", lambda *a: calls.append(1) or real(*a))
    x, w, mask, b = _make((9,), 20, 11, 0.5, torch.float32, device)
    w.requires_grad_()
    with dw_backend("kernel"):
        masked_linear(x, w, mask, b).sum().backward()
    assert calls == [1]


@pytest.mark.parametrize("density", DENSITIES)
def test_masked_copy_cache_follows_weight_and_mask(density, device):
    """Exact mode caches where(mask, weight, 0); an in-place change of either must be seen."""
    x, w, mask, b = _make((4, 9), 37, 21, density, torch.float32, device)
    for step in range(3):
        y = masked_linear(x, w, mask, b)
        _close(y, _reference(x, w, mask, b, torch.zeros_like(y))[0], torch.float32, 37, "y")
        if step == 0:
            w.mul_(-2.0)  # in place: weight version moves
        else:
            mask[step::3, ::2] = ~mask[step::3, ::2]  # in place: mask version moves


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
        ("mask_shape", ValueError, r"expected mask of the weight's shape \[4, 6\], got \[6, 4\]"),
        ("mask_dtype", TypeError, r"expected mask of dtype torch.bool, got torch.float32"),
        ("mask_none", TypeError, r"expected mask as a torch.bool Tensor, got NoneType"),
        ("device", ValueError, r"expected mask on the weight's device meta, got cpu"),
        ("weight_rank", ValueError, r"expected weight 2-D .* got \[24\]"),
        ("x_int", TypeError, r"expected x as a floating-point tensor, got torch.int64"),
        ("x_features", ValueError, r"expected x of shape \[\.\.\., 6\] .* got \[3, 5\]"),
        ("bias_shape", ValueError, r"expected bias of shape \[4\], got \[6\]"),
        ("dtype_mix", TypeError, r"expected x of weight's dtype torch.float32, got torch.float16"),
    ],
)
def test_bad_input_raises(case, exc, match):
    x, w, mask, b = torch.randn(3, 6), torch.randn(4, 6), torch.ones(4, 6, dtype=torch.bool), None
    if case == "mask_shape":
        mask = torch.ones(6, 4, dtype=torch.bool)
    elif case == "mask_dtype":
        mask = torch.ones(4, 6)
    elif case == "mask_none":
        mask = None
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
    """torch.compile(fullgraph=True) traces a model of SparseLinear layers (vendor GEMMs, the
    masked dW as a traceable where)."""
    from sparsekern.nn import SparseLinear

    torch._dynamo.reset()
    model = torch.nn.Sequential(SparseLinear(20, 30), torch.nn.ReLU(), SparseLinear(30, 5)).to(
        device
    )
    for layer in (model[0], model[2]):
        layer.set_mask(torch.rand_like(layer.weight) < 0.5)
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
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_target_size_bf16(backend):
    M, N, K = 8192, 4096, 4096
    dev = torch.device("cuda")
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.rand(N, K, device=dev) < 0.1
    with dw_backend(backend):
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
def test_gpu_dw_kernel_offsets_beyond_int32():
    """x has 2^31 + 2^20 elements: row offsets past 2^31 must not wrap in the fused dW."""
    K, N = 4096, 32
    M = (2**31 + 2**20) // K
    dev = torch.device("cuda")
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    mask = torch.rand(N, K, device=dev) < 0.5
    dw = ml.masked_linear_dw_launch(dy, x, mask)
    dwr = (dy.float().t() @ x.float()) * mask
    torch.testing.assert_close(dw.float(), dwr, rtol=2e-2, atol=2e-2 * math.sqrt(M))


@pytest.mark.parametrize("assume_pruned_zero", [True, False])
def test_cpu_dw_on_pooled_mapping_matches_float64(
    monkeypatch, pooled_gradients, assume_pruned_zero
):
    """From ``_fresh.FRESH_MIN`` weights (lowered here) the CPU vendor dW is written into a
    pooled mapping, then masked: the same values and gradients as the float64 reference, exactly
    0 at pruned entries, through ``masked_linear`` and the modules' ``masked_linear_trusted``; it
    stays out of autocast (dy would come back in bf16) and of ``create_graph``."""
    calls = []
    real = ml._fresh_dw
    monkeypatch.setattr(ml, "_fresh_dw", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(11)
    mask = torch.rand(37, 29, generator=g) < 0.45
    w64 = torch.randn(37, 29, generator=g, dtype=torch.float64)
    if assume_pruned_zero:
        w64 = w64 * mask
    else:
        w64[~mask] = float("nan")  # where-semantics: never read
    x64 = torch.randn(2, 5, 29, generator=g, dtype=torch.float64)
    b64 = torch.randn(37, generator=g, dtype=torch.float64)
    gy = torch.randn(2, 5, 37, generator=g, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (x64, torch.where(mask, w64, 0), b64)]
    ml.masked_linear_reference(ref[0], ref[1], mask, ref[2]).backward(gy)
    fns = [lambda a, b, c: masked_linear(a, b, mask, c, assume_pruned_zero=assume_pruned_zero)]
    if assume_pruned_zero:
        fns.append(lambda a, b, c: ml.masked_linear_trusted(a, b, mask, c))
    for fn in fns:
        got = [t.float().requires_grad_() for t in (x64, w64, b64)]
        y = fn(*got)
        y.backward(gy.float())
        _close(y, ml.masked_linear_reference(x64, torch.where(mask, w64, 0), mask, b64),
               torch.float32, 29, "y")  # fmt: skip
        for name, t, r in zip(("x", "weight", "bias"), got, ref):
            _close(t.grad, r.grad, torch.float32, 10, f"d{name}")
        assert torch.equal(got[1].grad[~mask], torch.zeros(int((~mask).sum())))
    assert len(calls) == len(fns)
    x = x64.float().requires_grad_()
    w = torch.where(mask, w64, 0).float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ml.masked_linear_trusted(x, w, mask, None).float().sum().backward()
    (dx,) = torch.autograd.grad(masked_linear(x, w, mask).sum(), x, create_graph=True)
    assert dx.requires_grad  # a differentiable backward (the formulas, not the fresh path)
    assert len(calls) == len(fns)  # neither autocast nor create_graph took the fresh path
    assert torch.equal(w.grad[~mask], torch.zeros(int((~mask).sum())))
