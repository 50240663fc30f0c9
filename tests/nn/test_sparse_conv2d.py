"""SparseConv2d and the masked_conv2d op: against nn.Conv2d / F.conv2d(x, W * M), gradients,
validation messages, state dict and copies."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import SparseConv2d
from sparsekern.ops.masked_conv2d import masked_conv2d, masked_conv2d_reference

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")


@pytest.fixture(autouse=True)
def _exact_fp32_conv(monkeypatch):
    """On CUDA, fp32 F.conv2d (cuDNN) runs in TF32 by default and masked_conv2d follows the same
    flag; the float32 tolerances here need true fp32 on both sides."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


# (kernel_size, stride, padding, dilation, groups, bias, padding_mode), input 8 -> 4 channels
CONFIGS = [
    (3, 1, 0, 1, 1, True, "zeros"),
    (3, 2, 1, 1, 1, False, "zeros"),
    ((4, 2), 1, "same", (1, 3), 1, True, "zeros"),  # asymmetric 'same'
    (3, 1, "valid", 1, 2, True, "zeros"),
    (3, (2, 1), (1, 2), (1, 2), 4, True, "reflect"),
    (3, 1, 1, 1, 1, True, "circular"),
    (2, 1, "same", 1, 2, False, "replicate"),
]


def conv_pair(config, device):
    k, stride, padding, dilation, groups, bias, padding_mode = config
    dense = nn.Conv2d(8, 4, k, stride, padding, dilation, groups, bias, padding_mode, device=device)
    sparse = SparseConv2d(
        8, 4, k, stride, padding, dilation, groups, bias, padding_mode, device=device
    )
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


@pytest.mark.parametrize("config", CONFIGS)
def test_all_true_matches_nn_conv2d(device, config):
    dense, sparse = conv_pair(config, device)
    x = torch.randn(2, 8, 9, 10, device=device)
    out = sparse(x)
    assert out.shape == dense(x).shape
    torch.testing.assert_close(out, dense(x))


@pytest.mark.parametrize("config", CONFIGS)
def test_random_mask_matches_masked_dense(device, config):
    dense, sparse = conv_pair(config, device)
    mask = torch.rand(sparse.weight.shape, device=device) < 0.5
    with torch.no_grad():
        sparse.mask.copy_(mask)  # weights stay nonzero at pruned entries: the op must mask them
        dense.weight.mul_(mask)
    x = torch.randn(2, 8, 9, 10, device=device)
    torch.testing.assert_close(sparse(x), dense(x))
    torch.testing.assert_close(sparse(x[0]), dense(x[0]))  # unbatched input


@pytest.mark.parametrize("config", CONFIGS[:5])
def test_gradients_against_float64_reference(device, config):
    _, layer = conv_pair(config, device)
    mask = torch.rand(layer.weight.shape, device=device) < 0.5
    with torch.no_grad():
        layer.mask.copy_(mask)
    x = torch.randn(2, 8, 9, 10, device=device, requires_grad=True)
    out = layer(x)
    dy = torch.randn_like(out)
    out.backward(dy)

    dense64 = copy.deepcopy(layer).double()
    x64 = x.detach().double().requires_grad_()
    w64 = dense64.weight
    if layer.padding_mode == "zeros":
        pad_x, padding = x64, layer.padding
    else:
        pad_x = F.pad(x64, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    y64 = F.conv2d(
        pad_x, w64 * mask, dense64.bias, layer.stride, padding, layer.dilation, layer.groups
    )
    y64.backward(dy.double())

    assert bool((layer.weight.grad[~mask] == 0).all()), "weight.grad must be exactly 0 when pruned"
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad, w64.grad.float(), **tol)
    torch.testing.assert_close(x.grad, x64.grad.float(), **tol)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, dense64.bias.grad.float(), **tol)


def test_op_matches_reference_and_forms_of_padding(device):
    x = torch.randn(1, 4, 7, 6, device=device)
    w = torch.randn(6, 2, 3, 2, device=device)
    m = torch.rand(w.shape, device=device) < 0.6
    b = torch.randn(6, device=device)
    for padding in (0, 1, (2, 1), [1, 0], "valid", "same"):
        got = masked_conv2d(x, w, m, b, 1, padding, (2, 1), 2)
        torch.testing.assert_close(got, masked_conv2d_reference(x, w, m, b, 1, padding, (2, 1), 2))


def test_pruned_weight_grad_is_exactly_zero_even_when_raw_grad_is_not_finite(device):
    x = torch.randn(1, 2, 5, 5, device=device)
    x[0, 0, 2, 2] = float("inf")
    w = torch.randn(3, 2, 3, 3, device=device, requires_grad=True)
    m = torch.rand(w.shape, device=device) < 0.5
    masked_conv2d(x, w, m).sum().backward()
    assert bool((w.grad[~m] == 0).all())


def test_autocast_cpu_bfloat16():
    x = torch.randn(2, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    m = torch.rand(w.shape) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = masked_conv2d(x, w, m, b, padding=1)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    assert bool((w.grad[~m] == 0).all())


def test_module_double_backward_matches_conv2d():
    """A gradient penalty through a SparseConv2d (WGAN-GP, R1): second-order terms are right and
    the weight's gradient stays zero at pruned entries."""
    conv = SparseConv2d(2, 3, 3, padding=1)
    conv.set_mask(torch.rand(conv.weight.shape) < 0.5)
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    (gx,) = torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)
    gx.square().sum().backward()
    w = conv.weight.detach().clone().requires_grad_()
    (gx_ref,) = torch.autograd.grad(
        torch.nn.functional.conv2d(x, w * conv.mask, conv.bias, padding=1).square().sum(),
        x,
        create_graph=True,
    )
    gx_ref.square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, w.grad * conv.mask, rtol=1e-4, atol=1e-4)
    assert (conv.weight.grad[~conv.mask] == 0).all()


def _args(device):
    x = torch.randn(2, 4, 6, 6, device=device)
    w = torch.randn(6, 4, 3, 3, device=device)
    return x, w, torch.ones(6, 4, 3, 3, dtype=torch.bool, device=device)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda x, w, m: (x, w, m[:3]),
            ValueError,
            r"expected mask of weight's shape \[6, 4, 3, 3\], got \[3, 4, 3, 3\]",
        ),
        (
            lambda x, w, m: (x, w, m.float()),
            TypeError,
            r"expected mask of dtype torch.bool, got torch.float32",
        ),
        (
            lambda x, w, m: (x[0, 0], w, m),
            ValueError,
            r"expected x of rank 4 \[N, C_in, H, W\] or 3 \[C_in, H, W\], got rank 2",
        ),
        (lambda x, w, m: (x, w[0], m[0]), ValueError, r"expected weight of rank 4 .*got rank 3"),
        (
            lambda x, w, m: (x.long(), w, m),
            TypeError,
            r"expected a floating-point x, got dtype torch.int64",
        ),
        (
            lambda x, w, m: (x.double(), w, m),
            TypeError,
            r"expected x of weight's dtype torch.float32, got torch.float64",
        ),
        (
            lambda x, w, m: (x[:, :3], w, m),
            ValueError,
            r"expected x with C_in = .* = 4 channels, got 3",
        ),
        (
            lambda x, w, m: (x, w, m.to("meta")),
            ValueError,
            r"expected mask on weight's device .*, got meta",
        ),
    ],
)
def test_op_validation_messages(device, change, error, message):
    x, w, m = change(*_args(device))
    with pytest.raises(error, match=message):
        masked_conv2d(x, w, m)


def test_op_validation_of_bias_and_conv_arguments(device):
    x, w, m = _args(device)
    with pytest.raises(ValueError, match=r"expected bias of shape \[6\] \(C_out\), got \[4\]"):
        masked_conv2d(x, w, m, torch.zeros(4, device=device))
    with pytest.raises(ValueError, match=r"expected bias on weight's device .*, got meta"):
        masked_conv2d(x, w, m, torch.zeros(6, device="meta"))
    with pytest.raises(ValueError, match=r"padding='same' needs stride 1 .*got stride=\(2, 2\)"):
        masked_conv2d(x, w, m, stride=2, padding="same")
    with pytest.raises(ValueError, match=r"'valid' or 'same', got 'full'"):
        masked_conv2d(x, w, m, padding="full")
    with pytest.raises(ValueError, match=r"expected stride >= 1, got 0"):
        masked_conv2d(x, w, m, stride=0)
    with pytest.raises(TypeError, match=r"expected dilation as an int or a pair of ints"):
        masked_conv2d(x, w, m, dilation=(1, 1, 1))
    with pytest.raises(ValueError, match=r"divisible by groups=4, got 6"):
        masked_conv2d(torch.randn(2, 4, 6, 6, device=device), w[:, :1], m[:, :1], groups=4)


def test_constructor_and_from_dense(device):
    layer = SparseConv2d(4, 6, 3, groups=2, bias=False, padding_mode="reflect", padding=1)
    assert layer.weight.shape == (6, 2, 3, 3) and layer.mask.shape == (6, 2, 3, 3)
    assert layer.mask.dtype == torch.bool and bool(layer.mask.all()) and layer.density == 1.0
    assert "density=1.0000" in repr(layer)

    dense = nn.Conv2d(4, 6, (3, 1), stride=2, padding="valid", dilation=2, groups=2, device=device)
    sparse = SparseConv2d.from_dense(dense)
    assert sparse.weight is dense.weight and sparse.bias is dense.bias
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(sparse, attr) == getattr(dense, attr), attr
    with pytest.raises(TypeError, match="expected an nn.Conv2d, got Linear"):
        SparseConv2d.from_dense(nn.Linear(2, 2))


def test_state_dict_dense_load_and_copies(device):
    layer = SparseConv2d(3, 5, 3, padding=1, device=device)
    assert list(layer.state_dict()) == ["weight", "bias", "mask"]
    layer.set_mask(torch.rand(layer.weight.shape, device=device) < 0.5)
    x = torch.randn(1, 3, 6, 6, device=device)

    other = SparseConv2d(3, 5, 3, padding=1, device=device)
    other.load_state_dict(layer.state_dict(), strict=True)
    torch.testing.assert_close(other(x), layer(x))

    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert isinstance(clone, SparseConv2d) and clone.mask is not layer.mask
        assert torch.equal(clone.mask, layer.mask)
        torch.testing.assert_close(clone(x), layer(x))

    dense = nn.Conv2d(3, 5, 3, padding=1, device=device)
    result = layer.load_state_dict(dense.state_dict(), strict=True)
    assert not result.missing_keys and bool(layer.mask.all())
    torch.testing.assert_close(layer(x), dense(x))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding=1),
        dict(padding="same", dilation=2),
        dict(padding=1, padding_mode="reflect", stride=2),
    ],
    ids=["pad1", "same_dil2", "reflect_s2"],
)
def test_block_mode_matches_default_mode(kwargs, device):
    from sparsekern.pruning.block import prune_blocks_

    torch.manual_seed(0)
    conv = SparseConv2d(18, 20, 3, device=device, block_size=16, **kwargs)
    assert conv.block_size == (16, 16) and "block_size=(16, 16)" in repr(conv)
    model = nn.Sequential(conv)
    prune_blocks_(model, density=0.5)
    ref = copy.deepcopy(conv)
    ref.set_block_size(None)
    x = torch.randn(2, 18, 7, 6, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, yr = conv(x), ref(x2)
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    assert (conv.weight.grad[~conv.mask] == 0).all()
    torch.testing.assert_close(conv(x[0]), ref(x2[0]), rtol=1e-4, atol=1e-4)  # unbatched


def test_block_mode_needs_groups_1_and_copies():
    with pytest.raises(ValueError, match="block mode needs groups=1, got groups=2"):
        SparseConv2d(4, 4, 3, groups=2, block_size=16)
    conv = SparseConv2d(4, 4, 3, block_size=(16, 32))
    assert copy.deepcopy(conv).block_size == (16, 32)
    assert pickle.loads(pickle.dumps(conv)).block_size == (16, 32)
    assert SparseConv2d.from_dense(conv).block_size == (16, 32)
    assert SparseConv2d.from_dense(nn.Conv2d(4, 4, 3), block_size=16).block_size == (16, 16)


def test_all_true_mask_trains_as_nn_conv2d_then_masks_after_an_in_place_edit():
    """As for SparseLinear: an all-True mask runs F.conv2d itself (gradients equal nn.Conv2d's);
    an in-place edit brings the masked dW back at the next forward."""
    from sparsekern.nn import execution_plan

    dense = nn.Conv2d(4, 6, 3, padding=1)
    sparse = SparseConv2d.from_dense(copy.deepcopy(dense))
    x = torch.randn(2, 4, 5, 5)
    for m in (dense, sparse):
        m(x).square().sum().backward()
    assert execution_plan(sparse)[0].path == "dense" and "all True" in execution_plan(sparse)[0].why
    assert torch.equal(sparse.weight.grad, dense.weight.grad)
    assert torch.equal(sparse.bias.grad, dense.bias.grad)
    sparse.mask[:3] = False
    sparse.weight.grad = None
    sparse(x).square().sum().backward()
    pruned = ~sparse.mask
    assert execution_plan(sparse)[0].path == "masked"
    assert bool((sparse.weight[pruned] == 0).all())
    assert bool((sparse.weight.grad[pruned] == 0).all())
    w = sparse.weight.detach().clone().requires_grad_()
    F.conv2d(x, w * sparse.mask, sparse.bias.detach(), padding=1).square().sum().backward()
    torch.testing.assert_close(sparse.weight.grad, w.grad * sparse.mask)
