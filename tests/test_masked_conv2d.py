"""masked_conv2d: the implicit-GEMM Triton kernels (through the interpreter on CPU) against a
float64 reference.

Every case draws fresh random inputs with odd image sizes and channel counts that are not
multiples of the tiles, masks of density 0, 1 and in between, and checks y, dx, dweight and dbias
by name. Shapes are tiny: the interpreter runs a 32x32x32 tile in milliseconds, not microseconds.
"""

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from sparsekern.nn import SparseConv2d, sparse_modules, sparsify
from sparsekern.ops._dispatch import use_kernels

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


def _check_case(case, density, dtype, device):
    x, w, mask, b, conv = _make(case, density, dtype, device)
    for t in (x, w, b):
        t.requires_grad_()
    y = masked_conv2d(x, w, mask, b, **conv)
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


@pytest.fixture
def launch_counts(monkeypatch):
    """Count calls of the three launchers (the autograd Function looks them up in the module)."""
    counts = {}
    for name in ("masked_conv2d_fwd_launch", "masked_conv2d_dx_launch", "masked_conv2d_dw_launch"):
        real = getattr(mc, name)

        def counted(*a, _real=real, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(mc, name, counted)
    return counts


def test_kernels_run_not_the_reference(launch_counts, monkeypatch, device):
    """Under TRITON_INTERPRET=1 (or on CUDA) the Triton kernels run, not torch's convolutions."""
    if not use_kernels(torch.empty(0, device=device)):
        pytest.skip("kernels not in use on this device")

    def boom(*a, **k):
        raise AssertionError("reference path used")

    monkeypatch.setattr(mc.F, "conv2d", boom)
    monkeypatch.setattr(torch.nn.grad, "conv2d_input", boom)
    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", boom)
    x, w, mask, b, conv = _make(CASES["3x3_pad1"], 0.5, torch.float32, device)
    for t in (x, w, b):
        t.requires_grad_()
    masked_conv2d(x, w, mask, b, **conv).sum().backward()
    assert launch_counts == {
        "masked_conv2d_fwd_launch": 1,
        "masked_conv2d_dx_launch": 1,
        "masked_conv2d_dw_launch": 1,
    }


def test_sparse_conv2d_module_trains_through_kernels(launch_counts, device):
    if not use_kernels(torch.empty(0, device=device)):
        pytest.skip("kernels not in use on this device")
    layer = SparseConv2d(3, 5, 3, padding=1, device=device)
    layer.set_mask(torch.rand(layer.weight.shape, device=device) < 0.5)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(2, 3, 7, 6, device=device)
    before = layer.weight.detach().clone()
    layer(x).square().mean().backward()
    opt.step()
    assert launch_counts["masked_conv2d_fwd_launch"] == 1
    assert launch_counts["masked_conv2d_dw_launch"] == 1
    assert "masked_conv2d_dx_launch" not in launch_counts  # x needs no gradient
    assert torch.equal(layer.weight[~layer.mask], before[~layer.mask])  # pruned stay at 0
    assert not torch.equal(layer.weight, before)


def test_groups_take_the_reference(launch_counts, device):
    """groups > 1 has no kernel: it runs F.conv2d and stays exact at pruned weights."""
    x = torch.randn(2, 4, 7, 7, device=device)
    w = torch.randn(6, 2, 3, 3, device=device, requires_grad=True)
    mask = torch.rand(w.shape, device=device) < 0.5
    y = masked_conv2d(x, w, mask, groups=2, padding=1)
    y.sum().backward()
    assert launch_counts == {}
    torch.testing.assert_close(y, F.conv2d(x, w.detach() * mask, None, 1, 1, 1, 2))
    assert (w.grad[~mask] == 0).all()


def test_launchers_write_every_output_element(device):
    """Outputs poisoned with NaN before the launch: every element must be overwritten."""
    x, w, mask, b, conv = _make(CASES["3x3_s2_dil2"], 0.37, torch.float32, device)
    args = {k: _pair(v) for k, v in conv.items()}
    y = torch.full((2, 3, 4, 4), float("nan"), device=device)
    got = mc.masked_conv2d_fwd_launch(x, w, mask, b, **args, out=y)
    assert got is y
    ref = F.conv2d(x.double(), (w * mask).double(), b.double(), **conv)
    _close(y, ref, torch.float32, 36, "y")

    dy = torch.randn_like(y)
    dx = torch.full_like(x, float("nan"))
    mc.masked_conv2d_dx_launch(dy, w, mask, x.shape[-2:], **args, out=dx)
    _, dxr, dwr, _ = _reference(x, w, mask, b, dy, conv)
    _close(dx, dxr, torch.float32, 27, "dx")

    for splits in (1, 2, 3):
        dw = torch.full_like(w, float("nan"))
        mc.masked_conv2d_dw_launch(dy, x, mask, **args, out=dw, splits=splits)
        _close(dw, dwr, torch.float32, 32, f"dweight (splits={splits})")
        assert (dw[~mask] == 0).all()


class _FixedConfig:
    """Stands in for an autotuned kernel: launches its @triton.jit function with one given tile
    config (the interpreter otherwise only ever runs _INTERPRETER_CONFIG)."""

    def __init__(self, autotuned, **meta):
        self.jit, self.meta, self.launches = autotuned.fn, meta, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            return self.jit[grid(self.meta)](*args, **kwargs, **self.meta)

        return launch


@pytest.mark.parametrize("blocks", [(16, 16, 16, 1), (64, 32, 64, 2)], ids=str)
def test_other_tile_configs(blocks, monkeypatch, device):
    """Tile-edge masks with tiles smaller than the problem (16^3) and with BLOCK_K > K (64 > 45)."""
    if not use_kernels(torch.empty(0, device=device)):
        pytest.skip("kernels not in use on this device")
    bm, bn, bk, g = blocks
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g)
    fixed = {}
    for name in ("_conv_fwd_kernel", "_conv_dx_kernel", "_conv_dw_kernel"):
        fixed[name] = _FixedConfig(getattr(mc, name), **meta)
        monkeypatch.setattr(mc, name, fixed[name])
    x, w, mask, b, conv = _make((2, 5, 9, 8, 18, 3, 2, 1, 1), 0.5, torch.float32, device)
    args = {k: _pair(v) for k, v in conv.items()}
    y = mc.masked_conv2d_fwd_launch(x, w, mask, b, **args)
    dy = torch.randn_like(y)
    dx = mc.masked_conv2d_dx_launch(dy, w, mask, x.shape[-2:], **args)
    dw = mc.masked_conv2d_dw_launch(dy, x, mask, **args, splits=2)
    yr, dxr, dwr, _ = _reference(x, w, mask, b, dy, conv)
    _close(y, yr, torch.float32, 45, "y")
    _close(dx, dxr, torch.float32, 162, "dx")
    _close(dw, dwr, torch.float32, 40, "dweight")
    assert all(k.launches == 1 for k in fixed.values())


def test_dweight_split_reduction(device):
    """The split-K dW (fp32 partials summed) equals the single pass, for any number of splits."""
    x, w, mask, _, conv = _make(CASES["5x5_pad2"], 0.5, torch.bfloat16, device, bias=False)
    args = {k: _pair(v) for k, v in conv.items()}
    dy = torch.randn(1, 7, 11, 13, device=device).to(torch.bfloat16)
    _, _, dwr, _ = _reference(x, w, mask, None, dy, conv)
    for splits in (1, 2, 1000):  # 1000: clamped to one split per 64 reduction rows (3 here)
        dw = mc.masked_conv2d_dw_launch(dy, x, mask, **args, splits=splits)
        _close(dw, dwr, torch.bfloat16, 143, f"dweight (splits={splits})")


def test_dweight_skips_all_pruned_tiles(device):
    """A mask with whole empty 16x16 blocks of its [C_out, C_in*kH*kW] view: the flags mark them,
    those dW tiles are exactly zero, and the kept ones are right."""
    c_out, c_in = 40, 8  # GEMM view [40, 72]: flags [3, 5]
    x = torch.randn(2, c_in, 6, 5, device=device)
    w = torch.randn(c_out, c_in, 3, 3, device=device, requires_grad=True)
    mask = torch.rand(c_out, c_in, 3, 3, device=device) < 0.5
    view = mask.view(c_out, -1)
    view[:32, :32] = False  # flag blocks [0:2, 0:2] empty; with the 32x32 interpreter tile, a
    view[32:, 48:] = False  # whole tile (0, 0) is skipped; [2, 3:5] empty too
    flags = mc.conv_tile_flags(mask)
    assert flags.shape == (3, 5)
    assert flags[:2, :2].eq(0).all() and flags[2, 3:].eq(0).all() and flags[2, :3].gt(0).all()
    assert mc.conv_tile_flags(mask) is flags, "flags recomputed although the mask did not change"
    y = masked_conv2d(x, w, mask, padding=1)
    dy = torch.randn_like(y)
    y.backward(dy)
    _, _, dwr, _ = _reference(x, w, mask, None, dy, dict(padding=1))
    _close(w.grad, dwr, torch.float32, 60, "dweight")
    assert (w.grad.view(c_out, -1)[:32, :32] == 0).all() and (w.grad[~mask] == 0).all()
    mask[:] = True  # in-place change: the flags follow
    assert mc.conv_tile_flags(mask).eq(1).all()


def test_strided_inputs_and_expanded_grad(device):
    """Any strides run without copies: channels-last x, a transposed weight view, and the
    zero-stride dy that autograd passes for ``y.sum()``."""
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
    with pytest.raises(TypeError, match=r"kernels take float16, bfloat16 or float32, got .*64"):
        mc.masked_conv2d_fwd_launch(x.double(), w.double(), mask)
    with pytest.raises(TypeError, match=r"weight must be torch.float32, got torch.float16"):
        mc.masked_conv2d_fwd_launch(x, w.half(), mask)
    with pytest.raises(
        ValueError, match=r"out: expected shape \(2, 5, 9, 11\), .*got \(2, 5, 9, 10\)"
    ):
        mc.masked_conv2d_fwd_launch(x, w, mask, b, padding=(1, 1), out=x.new_empty(2, 5, 9, 10))
    with pytest.raises(ValueError, match=r"expected dy \[N, 5, 9, 11\] .* got dy \(2, 5, 7, 9\)"):
        mc.masked_conv2d_dx_launch(x.new_zeros(2, 5, 7, 9), w, mask, (9, 11), padding=(1, 1))
    with pytest.raises(ValueError, match=r"expected mask \[C_out, 3, kH, kW\] and dy"):
        mc.masked_conv2d_dw_launch(x.new_zeros(2, 5, 9, 11), x, mask[:, :2], padding=(1, 1))
    with pytest.raises(ValueError, match=r"expected splits >= 1, got 0"):
        mc.masked_conv2d_dw_launch(x.new_zeros(2, 5, 7, 9), x, mask, splits=0)
    with pytest.raises(ValueError, match=r"expected bias \[5\] on .*, got \(4,\) on"):
        mc.masked_conv2d_fwd_launch(x, w, mask, b[:4])
    with pytest.raises(ValueError, match=r"expected stride, dilation >= 1 and padding >= 0"):
        mc.masked_conv2d_fwd_launch(x, w, mask, stride=(0, 1))


def test_compile_fullgraph_model_of_sparse_conv2d(device):
    """torch.compile(fullgraph=True) traces SparseConv2d layers through the custom ops, and gives
    eager mode's outputs and gradients."""
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
def test_int64_offsets_large_activation():
    """x with more than 2^31 elements (4.3 GB in bf16): addresses past 2^31 must be right."""
    dev = torch.device("cuda")
    x = torch.randn(2, 16, 8192, 8200, device=dev, dtype=torch.bfloat16)
    assert x.numel() > 2**31
    w = torch.randn(8, 16, 3, 3, device=dev, dtype=torch.bfloat16)
    mask = torch.rand(w.shape, device=dev) < 0.5
    y = masked_conv2d(x, w, mask, padding=1)
    # The last 4x4 output pixels of the last image, from the 5x5 input corner (its first output
    # row/column sees the slice's zero padding instead of the real neighbours: dropped).
    ref = F.conv2d(x[1:, :, -5:, -5:].float(), (w * mask).float(), padding=1)[..., 1:, 1:]
    _close(y[1:, :, -4:, -4:], ref.double(), torch.bfloat16, 144, "y corner")


@pytest.mark.gpu
def test_sparsified_alexnet_trains_through_kernels(launch_counts):
    """torchvision AlexNet, sparsified with random conv masks: one forward+backward runs every
    conv through the kernels and matches the dense model holding the same (zeroed) weights."""
    torchvision = pytest.importorskip("torchvision")
    dev = torch.device("cuda")
    model = torchvision.models.alexnet(weights=None).to(dev).eval()  # eval: no dropout
    sparsify(model)
    convs = [m for _, m in sparse_modules(model) if isinstance(m, SparseConv2d)]
    assert len(convs) == 5
    for m in convs:
        m.set_mask(torch.rand(m.weight.shape, device=dev) < 0.35)  # zeroes the pruned weights
    dense = copy.deepcopy(model)
    for name, m in list(dense.features.named_children()):
        if isinstance(m, SparseConv2d):  # back to nn.Conv2d with the same (zeroed) weights
            conv = torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                                   m.padding, device=dev)  # fmt: skip
            conv.load_state_dict({"weight": m.weight, "bias": m.bias})
            dense.features[int(name)] = conv
    x = torch.randn(2, 3, 224, 224, device=dev)
    model(x).square().mean().backward()
    dense(x).square().mean().backward()
    assert launch_counts["masked_conv2d_fwd_launch"] == 5
    assert launch_counts["masked_conv2d_dw_launch"] == 5
    assert launch_counts["masked_conv2d_dx_launch"] == 4  # not for the image
    dense_convs = [m for m in dense.features if isinstance(m, torch.nn.Conv2d)]
    for i, (m, d) in enumerate(zip(convs, dense_convs)):
        assert (m.weight.grad[~m.mask] == 0).all(), f"conv{i + 1}: pruned dweight not 0"
        for name, got, ref in (
            ("dweight", m.weight.grad, d.weight.grad * m.mask),
            ("dbias", m.bias.grad, d.bias.grad),
        ):
            err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            assert err < 1e-4, f"conv{i + 1} {name}: relative error {err:.2e}"
