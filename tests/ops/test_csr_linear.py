"""csr_linear: the decode kernel (through the interpreter on CPU) and the vendor path (torch's CSR:
MKL, cuSPARSE) against a float64 reference; every gradient by name; odd shapes, empty rows,
densities 0, 1 and between, 1..32 rows of x, poisoned outputs, errors that name expected vs got."""

import importlib
import math

import pytest
import torch

from sparsekern.formats.csr import CSRMatrix
from sparsekern.ops.csr_linear import (
    KERNEL_MAX_ROWS,
    csr_linear,
    csr_linear_launch,
    csr_linear_reference,
)

cl = importlib.import_module("sparsekern.ops.csr_linear")

# (rtol, atol per sqrt(reduction length)): inputs are rounded to the dtype first, so what remains
# is fp32 accumulation and the output rounding (bf16 stores truncate under the interpreter: 2^-7).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = list(TOL)
# 37 x 53: rows and row starts that are not multiples of the kernel's 8-entry groups
N_OUT, K_IN = 37, 53


def _close(got, ref, dtype, reduce_len, name):
    rtol, atol = TOL[dtype]
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(
        got.double(), ref, rtol=rtol, atol=atol * math.sqrt(max(reduce_len, 1)),
        msg=lambda m: f"{name}: {m}",
    )  # fmt: skip


def _weight(density, dtype, device, shape=(N_OUT, K_IN)):
    w = torch.randn(shape, device=device).to(dtype)
    keep = torch.rand(shape, device=device) < density
    if 0 < density < 1:
        keep[2] = False  # an empty row
        keep[5] = True  # a full row: 53 entries = 6 groups of 8 + 5
    return CSRMatrix.from_dense(w * keep, mask=keep)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.15, 1.0])
@pytest.mark.parametrize("rows_x", [1, 3, 17, 32])
def test_kernel_forward_matches_float64(rows_x, density, dtype, device):
    m = _weight(density, dtype, device)
    x = torch.randn(rows_x, K_IN, device=device).to(dtype)
    b = torch.randn(N_OUT, device=device).to(dtype)
    out = torch.full((rows_x, N_OUT), float("nan"), device=device, dtype=dtype)
    y = csr_linear_launch(x, m.values, m.row_ptr, m.col_idx, b, N_OUT, K_IN, out=out)
    assert y is out
    ref = x.double() @ m.to_dense().double().t() + b.double()
    _close(y, ref, dtype, K_IN, f"y rows={rows_x} d={density}")


def test_kernel_long_rows_strided_x_no_bias(device):
    """Rows of 500+ entries (several body steps), x a transposed view, no bias."""
    m = _weight(0.9, torch.float32, device, shape=(9, 600))
    xt = torch.randn(600, 5, device=device)
    y = csr_linear_launch(xt.t(), m.values, m.row_ptr, m.col_idx, None, 9, 600)
    ref = xt.t().double() @ m.to_dense().double().t()
    _close(y, ref, torch.float32, 600, "y")


def test_kernel_int32_indices_for_wide_matrices(device):
    cols = 2**15 + 40
    w = torch.zeros(3, cols, device=device)
    w[0, [1, 2**15 + 3, cols - 1]] = torch.tensor([1.0, 2.0, 3.0], device=device)
    w[2, 9] = -1.0
    m = CSRMatrix.from_dense(w)
    assert m.col_idx.dtype == torch.int32
    x = torch.randn(2, cols, device=device)
    y = csr_linear_launch(x, m.values, m.row_ptr, m.col_idx, None, 3, cols)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("rows_x", [1, 4, 40])
def test_public_op_forward_and_gradients(rows_x, dtype, device):
    """Forward and every gradient by name (x, values, bias) against float64: the kernel at 1 and
    4 rows where kernels run, the vendor path at 40 rows and in float64."""
    m = _weight(0.3, dtype, device)
    values = m.values.detach().clone().requires_grad_()
    w = CSRMatrix(values, m.row_ptr, m.col_idx, m.shape)
    x = torch.randn(2, rows_x, K_IN, device=device).to(dtype).requires_grad_()  # 3-D input
    b = torch.randn(N_OUT, device=device).to(dtype).requires_grad_()
    y = csr_linear(x, w, b)
    assert y.shape == (2, rows_x, N_OUT)
    dy = torch.randn_like(y)
    y.backward(dy)

    vr = values.detach().double().requires_grad_()
    xr = x.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_()
    wr = CSRMatrix(vr, m.row_ptr, m.col_idx, m.shape)
    yr = csr_linear_reference(xr, wr, br)
    yr.backward(dy.double())
    tol_dtype = dtype if dtype in TOL else torch.float32
    _close(y.to(tol_dtype) if dtype == torch.float64 else y, yr.detach(), tol_dtype, K_IN, "y")
    for name, got, ref, red in (
        ("x.grad", x.grad, xr.grad, N_OUT),
        ("values.grad", values.grad, vr.grad, 2 * rows_x),
        ("bias.grad", b.grad, br.grad, 2 * rows_x),
    ):
        if dtype == torch.float64:
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        else:
            _close(got, ref, dtype, red, name)


def test_kernel_runs_for_decode_rows_and_vendor_above(device, monkeypatch):
    calls = []
    orig = cl.csr_linear_launch
    monkeypatch.setattr(
        cl, "csr_linear_launch", lambda *a, **k: calls.append(a[0].shape) or orig(*a, **k)
    )
    m = _weight(0.3, torch.float32, device)
    for rows in (1, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1):
        y = csr_linear(torch.randn(rows, K_IN, device=device), m)
        assert y.shape == (rows, N_OUT)
    assert calls == [(1, K_IN), (KERNEL_MAX_ROWS, K_IN)]


def test_reference_path_runs_torch_csr_and_caches_it(monkeypatch):
    """CPU without the interpreter: MKL's CSR product, the torch tensor built once per weight."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    built = []
    orig = CSRMatrix.to_sparse_csr
    monkeypatch.setattr(CSRMatrix, "to_sparse_csr", lambda s, *a: built.append(1) or orig(s, *a))
    m = _weight(0.3, torch.float32, "cpu")
    x = torch.randn(5, K_IN)
    for _ in range(3):
        y = csr_linear(x, m)
    assert len(built) == 1 and y.t().is_contiguous()  # W @ x^T, as torch's own CSR gives it
    torch.testing.assert_close(y, x @ m.to_dense().t(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        m.values.mul_(2)  # in place: the version counter invalidates the cached tensor
    torch.testing.assert_close(csr_linear(x, m), x @ m.to_dense().t(), rtol=1e-5, atol=1e-5)
    assert len(built) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_path_16_bit_cpu(dtype, monkeypatch):
    """MKL has no 16-bit CSR product: computed in float32, returned in the input dtype."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = _weight(0.3, dtype, "cpu")
    x = torch.randn(3, K_IN).to(dtype)
    y = csr_linear(x, m)
    ref = x.double() @ m.to_dense().double().t()
    _close(y, ref, dtype, K_IN, "y")


def test_empty_shapes(device):
    m = CSRMatrix.from_dense(torch.zeros(4, 0, device=device))
    b = torch.randn(4, device=device)
    torch.testing.assert_close(csr_linear(torch.randn(3, 0, device=device), m, b), b.expand(3, 4))
    m = _weight(0.5, torch.float32, device)
    assert csr_linear(torch.randn(0, K_IN, device=device), m).shape == (0, N_OUT)


def test_autocast_casts_like_linear(device):
    m = _weight(0.4, torch.float32, device)
    x = torch.randn(2, K_IN, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = csr_linear(x, m)
    assert y.dtype == torch.bfloat16
    _close(y, x.double() @ m.to_dense().double().t(), torch.bfloat16, K_IN, "y")


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("weight", TypeError, "expected weight as a CSRMatrix, got Tensor"),
        ("x_shape", ValueError, r"expected x of shape \[\.\.\., 53\] \(the weight's columns\)"),
        ("x_int", TypeError, "expected x as a floating-point tensor, got torch.int64"),
        (
            "dtype_mix",
            TypeError,
            "expected x of the weight's dtype torch.float32, got torch.float16",
        ),
        ("bias_shape", ValueError, r"expected bias of shape \[37\], got \[36\]"),
        ("bias_dtype", TypeError, "expected bias as torch.float32"),
    ],
)
def test_errors_name_expected_and_got(case, exc, match, device):
    m = _weight(0.3, torch.float32, device)
    x, b, w = torch.randn(2, K_IN, device=device), None, m
    if case == "weight":
        w = m.to_dense()
    elif case == "x_shape":
        x = torch.randn(2, K_IN + 1, device=device)
    elif case == "x_int":
        x = torch.ones(2, K_IN, dtype=torch.long, device=device)
    elif case == "dtype_mix":
        x = x.half()
    elif case == "bias_shape":
        b = torch.randn(N_OUT - 1, device=device)
    elif case == "bias_dtype":
        b = torch.randn(N_OUT, device=device, dtype=torch.float64)
    with pytest.raises(exc, match=match):
        csr_linear(x, w, b)


def test_launcher_refuses_batches_above_the_kernel_range(device):
    m = _weight(0.3, torch.float32, device)
    x = torch.randn(KERNEL_MAX_ROWS + 1, K_IN, device=device)
    with pytest.raises(ValueError, match=r"serves 1\.\.32 rows of x \(decode sizes\), got 33"):
        csr_linear_launch(x, m.values, m.row_ptr, m.col_idx, None, N_OUT, K_IN)
    with pytest.raises(ValueError, match=r"out: expected shape \[2, 37\]"):
        csr_linear_launch(x[:2], m.values, m.row_ptr, m.col_idx, None, N_OUT, K_IN,
                          out=torch.empty(2, 36, device=device))  # fmt: skip


def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    m = _weight(0.3, torch.float32, device)
    b = torch.randn(N_OUT, device=device)
    f = lambda x: torch.relu(csr_linear(x, m, b)) * 2  # noqa: E731
    x = torch.randn(4, K_IN, device=device)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=1e-5, atol=1e-5)


# --- GPU only: target sizes and 64-bit offsets ------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("rows_x", [1, 8, 32])
def test_gpu_alexnet_fc6_bf16(rows_x):
    dev = torch.device("cuda")
    w = torch.randn(4096, 9216, device=dev, dtype=torch.bfloat16)
    keep = torch.rand(4096, 9216, device=dev) < 0.1
    m = CSRMatrix.from_dense(w * keep, mask=keep)
    x = torch.randn(rows_x, 9216, device=dev, dtype=torch.bfloat16)
    b = torch.randn(4096, device=dev, dtype=torch.bfloat16)
    y = csr_linear_launch(x, m.values, m.row_ptr, m.col_idx, b, 4096, 9216)
    ref = x.double() @ m.to_dense().double().t() + b.double()
    _close(y, ref, torch.bfloat16, 922, "y")


@pytest.mark.gpu
def test_gpu_offsets_beyond_int32():
    """2^31 + 2^21 stored entries (int64 row_ptr): the rows past 2^31 must not wrap."""
    dev = torch.device("cuda")
    cols = 2**15
    rows = (2**31 + 2**21) // cols
    row_ptr = torch.arange(rows + 1, device=dev, dtype=torch.int64) * cols
    col_idx = torch.arange(cols, device=dev, dtype=torch.int16).repeat(rows)
    values = torch.randn(rows * cols, device=dev, dtype=torch.bfloat16)
    x = torch.randn(2, cols, device=dev, dtype=torch.bfloat16)
    y = csr_linear_launch(x, values, row_ptr, col_idx, None, rows, cols)
    tail = values[-4 * cols :].view(4, cols).double()
    _close(y[:, -4:], x.double() @ tail.t(), torch.bfloat16, cols, "y (last rows)")
    head = values[: 2 * cols].view(2, cols).double()
    _close(y[:, :2], x.double() @ head.t(), torch.bfloat16, cols, "y (first rows)")
