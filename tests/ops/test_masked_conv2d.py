"""masked_conv2d (F.conv2d on the masked weight, masked weight gradient) against a float64
reference, in exact mode and the modules' ``assume_pruned_zero`` mode.

Every case draws fresh random inputs with odd image sizes and channel counts that are not
multiples of the tiles, masks of density 0, 1 and in between, and checks y, dx, dweight and dbias
by name.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from sparsekern.nn import SparseConv2d

# The module, not the function of the same name that sparsekern.ops exports.
mc = importlib.import_module("sparsekern.ops.masked_conv2d")
masked_conv2d = mc.masked_conv2d

# Per-dtype tolerance: (rtol, atol per sqrt(reduction length)), as in test_masked_linear.py.
# Inputs are rounded to the dtype first and the float64 reference uses the rounded values, so what
# remains is fp32 accumulation and the final rounding (bf16 2^-8; the interpreter truncates, 2^-7).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = list(TOL)
DENSITIES = [0.0, 0.37, 1.0]


@pytest.fixture(autouse=True)
def _exact_fp32_conv(monkeypatch):
    """On CUDA, fp32 F.conv2d (cuDNN) runs in TF32 by default and masked_conv2d follows the same
    flag; the float32 tolerances here need true fp32 on both sides."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


# name -> (N, C_in, H, W, C_out, kernel, stride, padding, dilation)
CASES = {
    "1x1": (2, 5, 7, 9, 6, 1, 1, 0, 1),
    "3x3_pad1": (2, 3, 9, 11, 5, 3, 1, 1, 1),
    "5x5_pad2": (1, 4, 11, 13, 7, 5, 1, 2, 1),
    "11x11_s4_alexnet_conv1": (1, 3, 15, 17, 4, 11, 4, 2, 1),
    "3x3_s2_dil2": (2, 4, 10, 9, 3, 3, 2, 1, 2),
    "pairs_rect": (1, 3, 8, 10, 5, (3, 2), (2, 1), (1, 0), (1, 2)),
    "3x3_valid_s3": (1, 6, 13, 8, 17, 3, 3, 0, 1),  # stride > kernel: input pixels never used
}


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _make(case, density, dtype, device, bias=True):
    n, c_in, h, w, c_out, k, stride, padding, dilation = case
    kh, kw = _pair(k)
    x = torch.randn(n, c_in, h, w, device=device).to(dtype)
    weight = torch.randn(c_out, c_in, kh, kw, device=device).to(dtype)
    mask = torch.rand(weight.shape, device=device) < density
    if density == 1.0:
        mask[:] = True
    b = torch.randn(c_out, device=device).to(dtype) if bias else None
    return x, weight, mask, b, dict(stride=stride, padding=padding, dilation=dilation)


def _reference(x, w, mask, b, dy, conv):
    """float64 forward and gradients of conv2d(x, w*mask) + b, by torch's autograd."""
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if b is not None else None
    yr = F.conv2d(xr, wr * mask, br, **conv)
    yr.backward(dy.double())
    return yr.detach(), xr.grad, wr.grad, (br.grad if br is not None else None)


def _close(got, ref, dtype, reduce_len, name):
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


def _check_case(case, density, dtype, device, assume=False):
    x, w, mask, b, conv = _make(case, density, dtype, device)
    if assume:
        w = torch.where(mask, w, 0)
    for t in (x, w, b):
        t.requires_grad_()
    y = masked_conv2d(x, w, mask, b, **conv, assume_pruned_zero=assume)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, dbr = _reference(x, w, mask, b, dy, conv)
    c_out, c_in, kh, kw = w.shape
    n_pix = y.shape[0] * y.shape[2] * y.shape[3]
    _close(y, yr, dtype, c_in * kh * kw, "y")
    _close(x.grad, dxr, dtype, c_out * kh * kw, "dx")
    _close(w.grad, dwr, dtype, n_pix, "dweight")
    _close(b.grad, dbr, dtype, n_pix, "dbias")
    assert (w.grad[~mask] == 0).all(), "dweight must be exactly 0 at pruned weights"


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_forward_and_gradients_fp32(case, density, device):
    _check_case(CASES[case], density, torch.float32, device)


@pytest.mark.parametrize("case", ["3x3_pad1", "11x11_s4_alexnet_conv1"], ids=str)
def test_assume_pruned_zero_mode(case, device):
    _check_case(CASES[case], 0.37, torch.float32, device, assume=True)


@pytest.mark.parametrize(
    "case,dtype",
    [
        ("3x3_pad1", torch.float16),
        ("3x3_pad1", torch.bfloat16),
        ("pairs_rect", torch.float16),
        ("11x11_s4_alexnet_conv1", torch.bfloat16),
    ],
    ids=str,
)
def test_forward_and_gradients_16bit(case, dtype, device):
    _check_case(CASES[case], 0.37, dtype, device)


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_and_depthwise(groups, device):
    x = torch.randn(2, 4, 7, 6, device=device, requires_grad=True)
    w = torch.randn(8, 4 // groups, 3, 3, device=device, requires_grad=True)
    mask = torch.rand(w.shape, device=device) < 0.5
    y = masked_conv2d(x, w, mask, padding=1, groups=groups)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, _ = _reference(x, w, mask, None, dy, dict(padding=1, groups=groups))
    _close(y, yr, torch.float32, 9 * 4 // groups, "y")
    _close(x.grad, dxr, torch.float32, 72, "dx")
    _close(w.grad, dwr, torch.float32, 84, "dweight")
    assert (w.grad[~mask] == 0).all()


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nan_and_inf_at_pruned_weights_are_ignored(groups, dtype, device):
    """Pruned entries do not exist: NaN/inf there reach neither y nor a gradient, for grouped
    convs and float64 too (``where`` semantics, not ``W * M``)."""
    x = torch.randn(2, 4, 6, 6, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, device=device, dtype=dtype)
    mask = torch.rand(w.shape, device=device) < 0.5
    w[~mask] = math.nan
    w.view(-1)[(~mask).view(-1).nonzero()[:1]] = math.inf
    w.requires_grad_()
    y = masked_conv2d(x, w, mask, groups=groups)
    y.backward(torch.ones_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(w.grad).all() and (w.grad[~mask] == 0).all()


def test_double_backward_matches_reference(device):
    x = torch.randn(1, 3, 6, 5, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    mask = torch.rand(w.shape, device=device) < 0.5

    def penalty(fn):
        (gx,) = torch.autograd.grad(fn(x, w).square().sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.square().sum(), w)
        return gw

    got = penalty(lambda x, w: masked_conv2d(x, w, mask, padding=1))
    ref = penalty(lambda x, w: F.conv2d(x, w * mask, padding=1))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert (got[~mask] == 0).all()


def test_gradgradcheck_float64():
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(w.shape) < 0.5
    fn = lambda x, w: masked_conv2d(x, w, mask, padding=1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


def test_strided_inputs_and_expanded_grad(device):
    """Any strides: channels-last x, a transposed weight view, and the zero-stride dy that
    autograd passes for ``y.sum()``."""
    x, w, mask, b, conv = _make(CASES["3x3_pad1"], 0.5, torch.float32, device)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w_t = w.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # same values
    assert not w_t.is_contiguous()
    y = masked_conv2d(x_cl, w_t, mask, b, **conv)
    y.sum().backward()
    yr, dxr, dwr, _ = _reference(x, w, mask, b, torch.ones_like(y), conv)
    _close(y, yr, torch.float32, 27, "y")
    _close(x_cl.grad, dxr, torch.float32, 45, "dx")
    _close(w_t.grad, dwr, torch.float32, 198, "dweight")


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_same_padding_unbatched_and_no_bias(device):
    """'same' with an even kernel (asymmetric: one extra row/column padded first), unbatched x."""
    x = torch.randn(3, 7, 8, device=device, requires_grad=True)
    w = torch.randn(4, 3, 2, 4, device=device, requires_grad=True)
    mask = torch.rand(w.shape, device=device) < 0.6
    y = masked_conv2d(x, w, mask, padding="same", dilation=(2, 1))
    assert y.shape == (4, 7, 8)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    yr = F.conv2d(xr, wr * mask, padding="same", dilation=(2, 1))
    yr.backward(dy.double())
    _close(y, yr, torch.float32, 24, "y")
    _close(x.grad, xr.grad, torch.float32, 32, "dx")
    _close(w.grad, wr.grad, torch.float32, 56, "dweight")


def test_empty_batch(device):
    x = torch.randn(0, 3, 6, 6, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    mask = torch.rand(w.shape, device=device) < 0.5
    y = masked_conv2d(x, w, mask, torch.zeros(4, device=device))
    assert y.shape == (0, 4, 4, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape and (w.grad == 0).all()


def test_clear_errors(device):
    x, w, mask, b, _ = _make(CASES["3x3_pad1"], 0.5, torch.float32, device)
    with pytest.raises(ValueError, match=r"at least the dilated kernel's size 5x5, got 4x4"):
        masked_conv2d(x[..., :4, :4], w, mask, dilation=2)
    with pytest.raises(TypeError, match=r"expected stride as an int or a pair of ints, got 1.5"):
        masked_conv2d(x, w, mask, stride=1.5)
    with pytest.raises(ValueError, match=r"expected stride >= 1, got \(0, 1\)"):
        masked_conv2d(x, w, mask, stride=(0, 1))
    with pytest.raises(ValueError, match=r"expected bias of shape \[5\] \(C_out\), got \[4\]"):
        masked_conv2d(x, w, mask, b[:4])
    with pytest.raises(TypeError, match=r"expected mask of dtype torch.bool, got torch.float32"):
        masked_conv2d(x, w, mask.float())
    with pytest.raises(ValueError, match=r"expected x with C_in = .* got 2"):
        masked_conv2d(x[:, :2], w, mask)


def test_compile_fullgraph_model_of_sparse_conv2d(device):
    """torch.compile(fullgraph=True) traces SparseConv2d layers and gives eager mode's outputs
    and gradients."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        SparseConv2d(3, 4, 3, padding=1), torch.nn.ReLU(), SparseConv2d(4, 5, 3, stride=2)
    ).to(device)
    for layer in (model[0], model[2]):
        layer.set_mask(torch.rand(layer.weight.shape, device=device) < 0.5)
    x = torch.randn(2, 3, 7, 8, device=device, requires_grad=True)
    ref = model(x)
    ref.square().sum().backward()
    grads = [t.grad.clone() for t in (x, *model.parameters())]
    model.zero_grad()
    x.grad = None
    out = torch.compile(model, fullgraph=True)(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, t in zip(grads, (x, *model.parameters())):
        torch.testing.assert_close(t.grad, g, rtol=1e-5, atol=1e-5)
    assert (model[0].weight.grad[~model[0].mask] == 0).all()


@pytest.mark.gpu
def test_gpu_vgg_shape_bf16_channels_last():
    dev = torch.device("cuda")
    x = torch.randn(8, 256, 28, 28, device=dev, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(256, 256, 3, 3, device=dev, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.rand(w.shape, device=dev) < 0.1
    y = masked_conv2d(x, w, mask, padding=1)
    dy = torch.randn_like(y)
    y.backward(dy)
    wm = (w.detach().float() * mask).requires_grad_()
    xr = x.detach().float().requires_grad_()
    yr = F.conv2d(xr, wm, padding=1)
    yr.backward(dy.float())
    torch.testing.assert_close(y.float(), yr, rtol=2e-2, atol=2e-2 * 48)
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=2e-2, atol=2e-2 * 48)
    torch.testing.assert_close(w.grad.float(), wm.grad * mask, rtol=2e-2, atol=2e-2 * 80)
    assert (w.grad[~mask] == 0).all()
