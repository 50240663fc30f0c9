"""sparse_train's Triton kernels (through the interpreter on CPU): SpMM (both variants) and SDDMM
against float64 on fresh random inputs; odd shapes, densities 0, 1 and between, empty and full
rows, panels that straddle the matrix end, fp32 / fp16 / bf16, strided operands, poisoned
outputs; the three products of a training step (forward, dX through the CSR of W^T, dW at the
mask); errors that name expected vs got."""

import math

import pytest
import torch

from sparsekern.ops.sparse_train import triton_sddmm as sd
from sparsekern.ops.sparse_train import triton_spmm as sp
from sparsekern.ops.sparse_train.triton_common import bench_csr, max_panel_nnz

# (rtol, atol per sqrt(reduction length)): inputs are rounded to the dtype first, so what remains
# is fp32 accumulation and the output rounding (bf16 stores truncate under the interpreter).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = list(TOL)
# 37 rows: three 16-row panels, the last one cut at 5 rows; K = 45 and M = 21 fit no tile
N, K, M = 37, 45, 21


def _close(got, ref, dtype, reduce_len, name):
    rtol, atol = TOL[dtype]
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(
        got.double(), ref, rtol=rtol, atol=atol * math.sqrt(max(reduce_len, 1)),
        msg=lambda m: f"{name}: {m}",
    )  # fmt: skip


def _csr(density, dtype, device, n=N, k=K):
    """CSR of a random [n, k] W at ``density``: row 2 empty, row 5 full (between 0 and 1)."""
    keep = torch.rand(n, k, device=device) < density
    if 0 < density < 1:
        keep[2] = False
        keep[5] = True
    w = torch.randn(n, k, device=device).to(dtype) * keep
    flat = keep.reshape(-1).nonzero().squeeze(1)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=device)
    torch.cumsum(keep.sum(1), 0, out=row_ptr[1:])
    col = (flat % k).to(torch.int32)
    return row_ptr.to(torch.int32), col, w.reshape(-1)[flat].contiguous(), w, keep


def _transpose(w, keep):
    """CSR of W^T, by the index builder's recipe: a stable sort of the entries by column; the
    values gathered through the permutation."""
    n, k = w.shape
    flat = keep.reshape(-1).nonzero().squeeze(1)
    col, row = flat % k, flat // k
    perm = torch.sort(col, stable=True).indices
    t_row_ptr = torch.zeros(k + 1, dtype=torch.int64, device=w.device)
    torch.cumsum(torch.bincount(col, minlength=k), 0, out=t_row_ptr[1:])
    values = w.reshape(-1)[flat]
    return t_row_ptr.to(torch.int32), row[perm].to(torch.int32), values[perm].contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("variant", ["rows", "dot"])
def test_spmm_matches_float64(variant, density, dtype, device):
    row_ptr, col, values, w, _ = _csr(density, dtype, device)
    x = torch.randn(K, M, device=device).to(dtype)
    out = torch.full((N, M), float("nan"), device=device, dtype=dtype)
    y = sp.spmm(row_ptr, col, values, x, N, variant=variant, out=out)
    assert y is out
    _close(y, w.double() @ x.double(), dtype, K, f"spmm {variant} d={density}")
    ref = sp.spmm_reference(row_ptr, col, values.double(), x.double(), N)
    _close(y, ref, dtype, K, "spmm vs its reference twin")


@pytest.mark.parametrize("variant", ["rows", "dot"])
def test_spmm_strided_operands_and_long_rows(variant, device):
    """x a transposed view (batch not contiguous), out a transposed view, rows of 130 entries
    (several BLOCK_J steps under the interpreter's config)."""
    row_ptr, col, values, w, _ = _csr(0.9, torch.float32, device, n=19, k=150)
    x = torch.randn(33, 150, device=device).t()  # [150, 33], strides (1, 150)
    out = torch.empty(33, 19, device=device).t()  # [19, 33], strides (1, 19)
    y = sp.spmm(row_ptr, col, values, x, 19, variant=variant, out=out)
    _close(y, w.double() @ x.double(), torch.float32, 150, f"spmm {variant} strided")


def test_spmm_row_swizzle(device):
    """Skewed rows get the longest-first order, and launching in it changes nothing."""
    keep = torch.zeros(40, 64, dtype=torch.bool, device=device)
    keep[::7] = True  # 6 full rows, the rest empty or short
    keep[1, :3] = True
    w = torch.randn(40, 64, device=device) * keep
    flat = keep.reshape(-1).nonzero().squeeze(1)
    row_ptr = torch.zeros(41, dtype=torch.int64, device=device)
    torch.cumsum(keep.sum(1), 0, out=row_ptr[1:])
    row_ptr, col, values = row_ptr.int(), (flat % 64).int(), w.reshape(-1)[flat].contiguous()
    order = sp.row_swizzle(row_ptr)
    assert order is not None and order.dtype == torch.int32
    lengths = torch.diff(row_ptr.long())[order.long()]
    assert bool((lengths[1:] <= lengths[:-1]).all()) and sorted(order.tolist()) == list(range(40))
    x = torch.randn(64, 9, device=device)
    y = sp.spmm(row_ptr, col, values, x, 40, variant="rows", row_order=order)
    _close(y, w.double() @ x.double(), torch.float32, 64, "spmm swizzled")
    uniform, *_ = bench_csr(0.5, 64, 400, device, torch.float32)
    assert sp.row_swizzle(uniform) is None  # binomial lengths: max/mean ~1.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_sddmm_matches_float64(density, dtype, device):
    row_ptr, col, _, _, keep = _csr(density, dtype, device)
    a = torch.randn(N, M, device=device).to(dtype)
    b = torch.randn(K, M, device=device).to(dtype)
    nnz = col.numel()
    out = torch.full((nnz,), float("nan"), device=device, dtype=dtype)
    got = sd.sddmm(row_ptr, col, a, b, out=out)
    assert got is out and got.shape == (nnz,)
    ref = (a.double() @ b.double().t())[keep]  # row-major order of the kept entries = CSR order
    _close(got, ref, dtype, M, f"sddmm d={density}")
    _close(got, sd.sddmm_reference(row_ptr, col, a.double(), b.double()), dtype, M, "twin")


def test_sddmm_strided_and_long_batch(device):
    """a, b transposed views; a batch of 70 (several BLOCK_M steps, a ragged last one); a
    panel holding more entries than one BLOCK_J chunk."""
    row_ptr, col, _, _, keep = _csr(0.8, torch.float32, device, n=20, k=30)
    assert max_panel_nnz(row_ptr, sd.PANEL_ROWS) > 16
    a = torch.randn(70, 20, device=device).t()
    b = torch.randn(70, 30, device=device).t()
    got = sd.sddmm(row_ptr, col, a, b)
    _close(got, (a.double() @ b.double().t())[keep], torch.float32, 70, "sddmm strided")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_training_step_products(dtype, device):
    """The three products of a linear layer's step on the kept weights only, feature-major:
    y^T = W x^T, dx^T = W^T dy^T (the CSR of W^T, values gathered through the permutation),
    dW = (dy^T x) at the mask; against the dense float64 step."""
    row_ptr, col, values, w, keep = _csr(0.25, dtype, device, n=24, k=33)
    t_row_ptr, t_col, t_values = _transpose(w, keep)
    batch = 18
    x = torch.randn(batch, 33, device=device).to(dtype)
    dy = torch.randn(batch, 24, device=device).to(dtype)
    xt, dyt = x.t().contiguous(), dy.t().contiguous()
    y_t = sp.spmm(row_ptr, col, values, xt, 24)
    dx_t = sp.spmm(t_row_ptr, t_col, t_values, dyt, 33)
    dw = sd.sddmm(row_ptr, col, dyt, xt)
    wd, xd, dyd = w.double(), x.double(), dy.double()
    _close(y_t.t(), xd @ wd.t(), dtype, 33, "y")
    _close(dx_t.t(), dyd @ wd, dtype, 24, "dx")
    _close(dw, (dyd.t() @ xd)[keep], dtype, batch, "dW at the mask")


def test_panel_select(device):
    row_ptr, col, values, w, _ = _csr(0.4, torch.float32, device)
    sel = sp.panel_select(row_ptr, values)
    rows = torch.repeat_interleave(torch.arange(N, device=device), torch.diff(row_ptr.long()))
    assert sel.shape == (values.numel(), sp.PANEL_ROWS)
    assert torch.equal(sel.sum(1), values)
    assert torch.equal(sel.abs().argmax(1)[values != 0], (rows % sp.PANEL_ROWS)[values != 0])
    assert int((sel != 0).sum(1).max()) <= 1


def test_variant_rule():
    assert sp.spmm_variant(torch.bfloat16, 4096) == "dot"
    assert sp.spmm_variant(torch.bfloat16, 16) == "rows"
    assert sp.spmm_variant(torch.float32, 4096) == "rows"


def test_errors_name_expected_and_got(device):
    row_ptr, col, values, _, _ = _csr(0.3, torch.float32, device)
    x = torch.randn(K, M, device=device)
    with pytest.raises(ValueError, match=r"expected row_ptr int32 \[38\], got torch.int64"):
        sp.spmm(row_ptr.long(), col, values, x, N)
    with pytest.raises(TypeError, match="expected x as torch.float32, got torch.float16"):
        sp.spmm(row_ptr, col, values, x.half(), N)
    with pytest.raises(ValueError, match="expected variant 'auto', 'rows' or 'dot', got 'tc'"):
        sp.spmm(row_ptr, col, values, x, N, variant="tc")
    with pytest.raises(ValueError, match="row_order serves variant 'rows' only"):
        sp.spmm(row_ptr, col, values, x, N, variant="dot", row_order=row_ptr[:-1])
    with pytest.raises(ValueError, match=r"expected values of col_idx's shape"):
        sp.spmm(row_ptr, col, values[:-1], x, N)
    with pytest.raises(ValueError, match=r"expected a \[37, M\].*got a \[37, 21\], b \[45, 20\]"):
        sd.sddmm(row_ptr, col, torch.randn(N, M), torch.randn(K, 20))
    with pytest.raises(
        TypeError, match="a: expected float16, bfloat16 or float32, got torch.float64"
    ):
        sd.sddmm(row_ptr, col, torch.randn(N, M).double(), torch.randn(K, M).double())


def test_compile_specs_cover_both_kernels_at_the_benchmark_shape():
    """The specs the static contract compiles (tests/ops/test_compile_check.py holds the hot ones
    to it, per op): every kernel, hot bf16 configs, the benchmark shape's values."""
    specs = list(sp.compile_specs()) + list(sd.compile_specs())
    hot = {s["name"].split("[")[0] for s in specs if s["hot"]}
    assert hot == {"sparse_spmm.rows", "sparse_spmm.dot", "sparse_sddmm.dot"}
    for s in specs:
        assert s["values"]["M"] == 4096 and s["values"]["N"] == 4096
        assert set(s["signature"]) | set(s["constexprs"]) == set(s["fn"].arg_names), s["name"]
        assert s["contract"] == ("memory" if ".rows[" in s["name"] else "gemm")


def test_batch_offsets_past_int32_are_detected():
    """The kernels keep batch offsets (``m * stride(1)``) in int32; an operand whose batch
    offsets pass 2^31 is copied by the launchers (meta tensors: no memory)."""
    from sparsekern.ops.sparse_train.triton_common import batch_offsets_fit

    assert batch_offsets_fit(torch.empty(4096, 4096, device="meta"))
    assert batch_offsets_fit(torch.empty_strided((3, 2), (1, 2**31 - 1), device="meta"))
    assert not batch_offsets_fit(torch.empty_strided((3, 3), (1, 2**30), device="meta"))


def test_bench_most_is_the_benchmark_matrix_fullest_panel():
    row_ptr, _, _ = bench_csr(0.05, 4096, 4096, "cpu", torch.bfloat16)
    assert max_panel_nnz(row_ptr, sd.PANEL_ROWS) == sd.BENCH_MOST


@pytest.mark.parametrize("variant", ["rows", "dot"])
def test_spmm_where_semantics_for_non_finite_x(variant, device):
    """An inf in x[k] reaches the rows that store column k, and no other row of their panel
    (the dot kernel's zeros would make 0 * inf = NaN there: it hands such x to "rows")."""
    keep = torch.zeros(16, 8, dtype=torch.bool, device=device)
    keep[3, 2] = keep[3, 5] = keep[7, 1] = keep[9, 5] = True
    w = torch.randn(16, 8, device=device) * keep
    flat = keep.reshape(-1).nonzero().squeeze(1)
    row_ptr = torch.zeros(17, dtype=torch.int64, device=device)
    torch.cumsum(keep.sum(1), 0, out=row_ptr[1:])
    row_ptr, col, values = row_ptr.int(), (flat % 8).int(), w.reshape(-1)[flat].contiguous()
    x = torch.randn(8, 16, device=device)
    x[2, 4] = float("inf")
    y = sp.spmm(row_ptr, col, values, x, 16, variant=variant)
    assert not torch.isfinite(y[3, 4])  # row 3 stores column 2
    finite = torch.ones_like(y, dtype=torch.bool)
    finite[3, 4] = False
    assert torch.isfinite(y[finite]).all(), f"{variant}: non-finite outside row 3, column 4"
    ok = x.isfinite().all(0)
    _close(y[:, ok], w.double() @ x[:, ok].double(), torch.float32, 8, "finite columns")


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_sddmm_where_semantics_for_non_finite_inputs(device):
    """An inf in a[r] or b[k] reaches the entries of row r / column k only, not the other
    entries of the panel (the kernel selects each entry's own column of its 16-wide product)."""
    row_ptr, col, _, _, keep = _csr(0.4, torch.float32, device, n=16, k=12)
    a = torch.randn(16, 9, device=device)
    b = torch.randn(12, 9, device=device)
    a[4, 3] = float("inf")
    b[7, 0] = float("nan")
    got = sd.sddmm(row_ptr, col, a, b)
    rows = torch.repeat_interleave(torch.arange(16, device=device), torch.diff(row_ptr.long()))
    hit = (rows == 4) | (col.long() == 7)
    assert torch.isfinite(got[~hit]).all()
    assert not torch.isfinite(got[hit]).any()
    ref = (a.double() @ b.double().t())[keep]
    _close(got[~hit], ref[~hit], torch.float32, 9, "sddmm finite entries")
