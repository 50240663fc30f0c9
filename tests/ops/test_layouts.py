"""No silent wrong result on any input layout: every op, with inputs, weights, masks and biases
drawn at random among contiguous, transposed, sliced (every other element), expanded
(stride 0) and channels_last layouts, against a float64 reference of forward and gradients."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from sparsekern.formats.block_sparse import BlockSparseMatrix
from sparsekern.ops import (
    block_masked_conv2d,
    block_masked_linear,
    block_sparse_conv2d,
    block_sparse_linear,
    masked_conv2d,
    masked_linear,
)
from sparsekern.ops.block_sparse_conv2d import conv_weight_from_gemm, conv_weight_to_gemm

CASES = 6


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The values of ``t`` in another memory layout."""
    if kind == "sliced":  # every other element of a bigger tensor along the last dim
        big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.clone()


def _draw(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    kinds = ["contiguous", "sliced", "transposed"] + (["channels_last"] if t.dim() == 4 else [])
    return _layout(t, rng.choice(kinds))


def _bias(rng: random.Random, n: int, device) -> torch.Tensor:
    kind = rng.choice(["contiguous", "sliced", "expanded"])
    if kind == "expanded":
        return torch.randn(1, device=device).expand(n)
    if kind == "sliced":  # the adversarial case: torch.arange(6.)[::2]
        return torch.randn(2 * n, device=device)[::2]
    return torch.randn(n, device=device)


def _check(fn, ref_fn, leaves, name):
    """Forward and every gradient of ``fn(*leaves)`` against ``ref_fn`` in float64."""
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in leaves]
    y = fn(*leaves)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_leaves = [
        t.detach().double().requires_grad_() if t.is_floating_point() else t for t in leaves
    ]
    yr = ref_fn(*ref_leaves)
    yr.backward(dy.double())
    scale = math.sqrt(max(y.numel(), 1))
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5 * scale, msg=f"{name}: y")
    for i, (t, r) in enumerate(zip(leaves, ref_leaves)):
        if t.is_floating_point():
            torch.testing.assert_close(
                t.grad.double(), r.grad, rtol=1e-5, atol=1e-5 * scale, msg=f"{name}: grad {i}"
            )


def _mask(rng, shape, device):
    m = torch.rand(shape, device=device) < rng.choice([0.3, 0.7])
    return _draw(rng, m)


@pytest.mark.parametrize("seed", range(CASES))
def test_masked_linear_layouts(seed, device):
    rng = random.Random(seed)
    n, k = rng.randint(3, 40), rng.randint(3, 40)
    x = _draw(rng, torch.randn(rng.randint(1, 9), k, device=device))
    w = _draw(rng, torch.randn(n, k, device=device))
    m, b = _mask(rng, (n, k), device), _bias(rng, n, device)
    _check(
        lambda x, w, b: masked_linear(x, w, m, b),
        lambda x, w, b: F.linear(x, w * m, b),
        [x, w, b],
        f"masked_linear[{seed}]",
    )


@pytest.mark.parametrize("seed", range(CASES))
def test_masked_conv2d_layouts(seed, device):
    rng = random.Random(seed)
    c_in, c_out, k = rng.randint(1, 6), rng.randint(1, 6), rng.choice([1, 3])
    x = _draw(rng, torch.randn(2, c_in, rng.randint(5, 9), rng.randint(5, 9), device=device))
    w = _draw(rng, torch.randn(c_out, c_in, k, k, device=device))
    m, b = _mask(rng, w.shape, device), _bias(rng, c_out, device)
    pad = rng.choice([0, 1])
    _check(
        lambda x, w, b: masked_conv2d(x, w, m, b, padding=pad),
        lambda x, w, b: F.conv2d(x, w * m, b, padding=pad),
        [x, w, b],
        f"masked_conv2d[{seed}]",
    )


def _block_mask(rng, n, k, device):
    """A mask of whole 16x16 blocks (some pruned), optionally with holes inside kept blocks."""
    grid = torch.rand(-(-n // 16), -(-k // 16), device=device) < 0.6
    m = grid.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :k]
    if rng.random() < 0.5:
        m &= torch.rand(n, k, device=device) < 0.8
    return _draw(rng, m)


@pytest.mark.parametrize("seed", range(CASES))
def test_block_masked_linear_layouts(seed, device):
    rng = random.Random(seed)
    n, k = rng.randint(17, 50), rng.randint(17, 50)
    x = _draw(rng, torch.randn(rng.randint(1, 9), k, device=device))
    w = _draw(rng, torch.randn(n, k, device=device))
    m, b = _block_mask(rng, n, k, device), _bias(rng, n, device)
    _check(
        lambda x, w, b: block_masked_linear(x, w, m, b, 16),
        lambda x, w, b: F.linear(x, w * m, b),
        [x, w, b],
        f"block_masked_linear[{seed}]",
    )


@pytest.mark.parametrize("seed", range(CASES))
def test_block_sparse_linear_layouts(seed, device):
    rng = random.Random(seed)
    n, k = rng.randint(17, 50), rng.randint(17, 50)
    dense = torch.randn(n, k, device=device) * _block_mask(rng, n, k, device)
    W = BlockSparseMatrix.from_dense(dense, 16)
    x = _draw(rng, torch.randn(rng.randint(1, 9), k, device=device))
    b = _bias(rng, n, device)
    values, row_ptr, col_idx = W.values, W.row_ptr, W.col_idx

    def fn(x, v, b):
        return block_sparse_linear(x, BlockSparseMatrix(v, row_ptr, col_idx, (n, k), 16), b)

    def ref(x, v, b):
        return F.linear(x, BlockSparseMatrix(v, row_ptr, col_idx, (n, k), 16).to_dense(), b)

    _check(fn, ref, [x, values, b], f"block_sparse_linear[{seed}]")


@pytest.mark.parametrize("seed", range(CASES // 2))
def test_block_masked_conv2d_layouts(seed, device):
    rng = random.Random(seed)
    c_in, c_out = rng.randint(3, 20), rng.randint(3, 20)
    x = _draw(rng, torch.randn(2, c_in, 6, 5, device=device))
    w = _draw(rng, torch.randn(c_out, c_in, 3, 3, device=device))
    m = _draw(rng, torch.rand(w.shape, device=device) < 0.6)
    b = _bias(rng, c_out, device)
    _check(
        lambda x, w, b: block_masked_conv2d(x, w, m, b, padding=1, block_size=16),
        lambda x, w, b: F.conv2d(x, w * m, b, padding=1),
        [x, w, b],
        f"block_masked_conv2d[{seed}]",
    )


@pytest.mark.parametrize("seed", range(CASES // 2))
def test_block_sparse_conv2d_layouts(seed, device):
    rng = random.Random(seed)
    c_in, c_out = rng.randint(3, 20), rng.randint(3, 20)
    shape = (c_out, c_in, 3, 3)
    dense = torch.randn(shape, device=device) * (torch.rand(shape, device=device) < 0.6)
    W = BlockSparseMatrix.from_dense(conv_weight_to_gemm(dense, 16), 16)
    x = _draw(rng, torch.randn(2, c_in, 6, 5, device=device))
    b = _bias(rng, c_out, device)
    values, row_ptr, col_idx, gemm_shape = W.values, W.row_ptr, W.col_idx, W.shape

    def matrix(v):
        return BlockSparseMatrix(v, row_ptr, col_idx, gemm_shape, 16)

    def fn(x, v, b):
        return block_sparse_conv2d(x, matrix(v), shape, b, padding=1)

    def ref(x, v, b):
        return F.conv2d(x, conv_weight_from_gemm(matrix(v).to_dense(), shape, 16), b, padding=1)

    _check(fn, ref, [x, values, b], f"block_sparse_conv2d[{seed}]")


def test_the_reported_case_strided_bias(device):
    """``masked_linear(x, w, m, torch.arange(6.)[::2])`` once added [0, 1, 2]."""
    x = torch.randn(2, 4, device=device)
    w = torch.randn(3, 4, device=device)
    m = torch.ones(3, 4, dtype=torch.bool, device=device)
    b = torch.arange(6.0, device=device)[::2]
    torch.testing.assert_close(masked_linear(x, w, m, b), F.linear(x, w, b))
    torch.testing.assert_close(block_masked_linear(x, w, m, b, 16), F.linear(x, w, b))
