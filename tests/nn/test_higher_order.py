"""Higher-order gradients (gradient penalties: WGAN-GP, R1; meta-learning; Hessian-vector
products) through every sparse module and op: correct where the op's backward is made of
differentiable torch ops, and a loud refusal where a kernel's backward is not (block-sparse and
CSR ops: once_differentiable). The issue: the CPU path of masked_linear saved ``W*M`` as a
constant, so the part of dW flowing through dx was lost (off by 1530 of max 2885) silently."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import sparsify
from sparsekern.formats import BlockSparseMatrix, CSRMatrix
from sparsekern.nn import SparseConv1D, SparseMultiheadAttention
from sparsekern.ops.block_sparse_conv2d import block_masked_conv2d, block_sparse_conv2d
from sparsekern.ops.block_sparse_linear import block_masked_linear, block_sparse_linear
from sparsekern.ops.csr_linear import csr_linear

bsl = importlib.import_module("sparsekern.ops.block_sparse_linear")  # the package, not the op
bsl_op = importlib.import_module("sparsekern.ops.block_sparse_linear.op")  # reads the bounds


def _prune_half(module):
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "mask") and isinstance(m.mask, torch.Tensor):
                from sparsekern.nn import set_mask

                set_mask(m, torch.rand(m.mask.shape) < 0.5)
    return module


def _modules():
    torch.manual_seed(0)
    yield "SparseLinear", _prune_half(sparsify(nn.Linear(5, 4)).double()), (3, 5)
    yield (
        "SparseConv2d",
        _prune_half(sparsify(nn.Conv2d(2, 3, 3, padding=1)).double()),
        (1, 2, 4, 4),
    )
    mha = SparseMultiheadAttention.from_dense(nn.MultiheadAttention(4, 2, batch_first=True))
    yield "SparseMultiheadAttention", _prune_half(mha.double()), (1, 3, 4)
    conv1d = SparseConv1D(4, 5)
    nn.init.normal_(conv1d.weight)
    yield "SparseConv1D", _prune_half(conv1d.double()), (2, 5)


MODULES = list(_modules())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", MODULES, ids=[c[0] for c in MODULES])
def test_gradgradcheck_modules(case, train):
    name, module, shape = case
    module.train(train)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = [p for p in module.parameters() if p.requires_grad]

    def fn(x):
        if isinstance(module, SparseMultiheadAttention):
            # need_weights=True: the math path. torch's fused CPU attention (need_weights=False)
            # has no double backward at all, dense nn.MultiheadAttention included
            return module(x, x, x, need_weights=True)[0]
        return module(x)

    assert torch.autograd.gradgradcheck(fn, (x,)), name
    # the weight part of the second derivative: d/dW of |dL/dx|^2 against the plain reference
    for p in params:
        p.grad = None
    y = fn(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    gx.square().sum().backward()
    got = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    assert got, name
    for n, p in module.named_parameters():
        masks = [
            m for m in module.modules() if getattr(m, "weight", None) is p and hasattr(m, "mask")
        ]
        if masks and p.grad is not None:
            assert int(p.grad[~masks[0].mask].count_nonzero()) == 0, (name, n)


def test_second_order_weight_gradient_matches_dense():
    """The issue's repro: the weight gradient of |dL/dx|^2 through SparseLinear equals the one
    through F.linear(x, W*M)."""
    torch.manual_seed(0)
    lin = _prune_half(sparsify(nn.Linear(64, 32)))
    x = torch.randn(16, 64, requires_grad=True)

    def penalty(fn, w):
        (gx,) = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.pow(2).sum(), w)
        return gw

    got = penalty(lin, lin.weight)
    w = lin.weight.detach().clone().requires_grad_()
    ref = penalty(lambda x: F.linear(x, w * lin.mask, lin.bias), w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def _penalty_grads(fn, x, params):
    """d/d(x, params) of |d sum(fn(x)^2) / dx|^2: the gradient-penalty pattern."""
    (gx,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), [x, *params], allow_unused=True)


def _cases(dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    w = torch.randn(32, 48, dtype=dtype, device=device, requires_grad=True)
    for name, bm in (
        ("sparse blocks", torch.tensor([[True, False, False], [False, False, False]])),
        ("dense blocks", torch.tensor([[True, True, False], [True, True, True]])),
    ):
        mask = bm.repeat_interleave(16, 0).repeat_interleave(16, 1).to(device)
        yield (
            f"block_masked_linear, {name}",
            lambda x, mask=mask: block_masked_linear(x, w, mask, None, (16, 16)),
            lambda x, mask=mask: F.linear(x, w * mask),
            (4, 48),
            [w],
        )
    m = BlockSparseMatrix.from_dense(w.detach() * mask, (16, 16))
    m.values.requires_grad_()
    yield (
        "block_sparse_linear",
        lambda x: block_sparse_linear(x, m),
        lambda x: F.linear(x, m.to_dense()),  # to_dense is differentiable in m.values
        (4, 48),
        [m.values],
    )
    wc = torch.randn(16, 16, 3, 3, dtype=dtype, device=device, requires_grad=True)
    cmask = torch.ones(16, 16, 3, 3, dtype=torch.bool, device=device)
    cmask[:, :, 0, 0] = False  # whole pruned taps: all-False blocks of the tap-major view
    yield (
        "block_masked_conv2d",
        lambda x: block_masked_conv2d(x, wc, cmask, None, padding=1, block_size=(16, 16)),
        lambda x: F.conv2d(x, wc * cmask, padding=1),
        (1, 16, 4, 4),
        [wc],
    )
    from sparsekern.ops.block_sparse_conv2d import conv_weight_to_gemm

    cm = BlockSparseMatrix.from_dense(conv_weight_to_gemm(wc.detach(), 16), (16, 16))
    yield (
        "block_sparse_conv2d",
        lambda x: block_sparse_conv2d(x, cm, (16, 16, 3, 3), padding=1),
        lambda x: F.conv2d(x, wc.detach(), padding=1),
        (1, 16, 4, 4),
        [],
    )
    c = CSRMatrix.from_dense(w.detach() * (torch.rand(32, 48, device=device) < 0.3))
    c.values.requires_grad_()
    yield (
        "csr_linear",
        lambda x: csr_linear(x, c),
        lambda x: F.linear(x, c.to_dense()),
        (4, 48),
        [c.values],
    )


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_ops_double_backward_matches_the_twin(case, monkeypatch):
    """Each op gives its plain twin's second-order gradients: the kernels' backward is not
    differentiable, so under create_graph=True it differentiates the twin (twin_vjp). Only the
    compact conv kernels (CUDA) refuse, loudly. Never a silently wrong or missing value."""
    name, fn, ref, shape, params = case
    # 1 of the 6 blocks kept: the CPU's BSR path also for a step computing dW (its own bound is 10%)
    monkeypatch.setattr(bsl_op, "CPU_BSR_MAX_DENSITY_TRAIN", bsl.CPU_BSR_MAX_DENSITY)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = fn(x)
    if name == "block_masked_linear, sparse blocks":
        # <= 25% of the blocks: the block path (torch BSR on the CPU, kernels on CUDA), not the
        # dense fallback -- the path whose backward is not differentiable
        assert type(y.grad_fn).__name__ == "_BlockSparseFunctionBackward"
    y.sum().backward()  # first order
    try:
        got = _penalty_grads(fn, x, params)
    except RuntimeError as e:
        assert name == "block_sparse_conv2d" and "create_graph=True" in str(e), str(e)
        return
    want = _penalty_grads(ref, x, params)
    assert all(g is not None for g in got)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_gradgradcheck_block_and_csr_ops():
    torch.manual_seed(0)
    for name, fn, _, shape, _params in CASES:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        if name == "block_sparse_conv2d" and x.is_cuda:
            continue
        assert torch.autograd.gradgradcheck(fn, (x,)), name


F32_IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("which", F32_IDS)
def test_ops_double_backward_float32(which, device):
    """float32 on the test device: the kernels' path (CUDA, or the interpreter on the CPU:
    ``TRITON_INTERPRET=1``), where twin_vjp is what makes the 2nd derivative right."""
    case = next(c for c in _cases(torch.float32, device) if c[0] == which)
    name, fn, ref, shape, params = case
    x = torch.randn(shape, device=device, requires_grad=True)
    try:
        got = _penalty_grads(fn, x, params)
    except RuntimeError as e:
        assert name == "block_sparse_conv2d" and "create_graph=True" in str(e), str(e)
        return
    want = _penalty_grads(ref, x, params)
    for g, r in zip(got, want):
        scale = r.abs().max().item()
        torch.testing.assert_close(g, r, rtol=2e-3, atol=2e-3 * scale)
