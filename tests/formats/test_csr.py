"""CSRMatrix: round trips through dense, torch's CSR and the state dict; narrow indices; validation
errors that name expected vs got."""

import io

import pytest
import torch

from sparsekern.formats.csr import INT16_MAX_COLS, CSRFormatError, CSRMatrix, csr_index_dtype


def _sparse(rows, cols, density, dtype=torch.float32):
    w = torch.randn(rows, cols, dtype=dtype)
    return w * (torch.rand(rows, cols) < density)


@pytest.mark.parametrize("density", [0.0, 0.07, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dense_round_trip(density, dtype):
    w = _sparse(37, 53, density, dtype)
    w[3] = 0  # an empty row
    m = CSRMatrix.from_dense(w)
    assert m.shape == (37, 53) and m.dtype == dtype
    assert m.col_idx.dtype == torch.int16 and m.row_ptr.dtype == torch.int32
    assert m.nnz == int((w != 0).sum())
    assert m.density == pytest.approx(m.nnz / (37 * 53))
    assert torch.equal(m.to_dense(), w)
    assert torch.equal(m.to_mask(), w != 0)
    assert m.nbytes() == m.nnz * (w.element_size() + 2) + 38 * 4


def test_mask_keeps_explicit_zeros():
    w = torch.randn(6, 9)
    mask = torch.rand(6, 9) < 0.5
    w[mask.nonzero()[0].tolist()] = 0.0  # a kept weight that is exactly zero
    m = CSRMatrix.from_dense(w, mask=mask)
    assert m.nnz == int(mask.sum())
    assert torch.equal(m.to_mask(), mask)
    assert torch.equal(m.to_dense(), w * mask)


def test_torch_csr_interchange():
    w = _sparse(20, 30, 0.3)
    m = CSRMatrix.from_dense(w)
    t = m.to_sparse_csr()
    assert t.layout == torch.sparse_csr and t.crow_indices().dtype == torch.int32
    assert t.values().data_ptr() == m.values.data_ptr()  # aliased, no copy of the values
    assert torch.equal(t.to_dense(), w)
    assert m.to_sparse_csr(torch.int64).col_indices().dtype == torch.int64
    back = CSRMatrix.from_sparse_csr(w.to_sparse_csr())
    assert back.col_idx.dtype == torch.int16 and torch.equal(back.to_dense(), w)
    x = torch.randn(30, 4)
    torch.testing.assert_close(torch.mm(t, x), w @ x)


def test_wide_matrix_takes_int32_indices():
    assert csr_index_dtype(INT16_MAX_COLS) == torch.int16
    assert csr_index_dtype(INT16_MAX_COLS + 1) == torch.int32
    w = torch.zeros(2, INT16_MAX_COLS + 5)
    w[0, -1] = 1.5
    w[1, 7] = -2.0
    m = CSRMatrix.from_dense(w)
    assert m.col_idx.dtype == torch.int32
    assert m.col_idx.tolist() == [INT16_MAX_COLS + 4, 7]
    assert torch.equal(m.to_dense(), w)
    with pytest.raises(CSRFormatError, match="expected int32 for 32773 columns"):
        CSRMatrix.from_dense(w, index_dtype=torch.int16)


def test_state_dict_round_trip_weights_only():
    m = CSRMatrix.from_dense(_sparse(11, 13, 0.4))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    back = CSRMatrix.from_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(back.to_dense(), m.to_dense()) and back.shape == m.shape
    with pytest.raises(CSRFormatError, match=r"expected keys \['values'"):
        CSRMatrix.from_state_dict({"values": m.values})


def test_to_moves_and_casts():
    m = CSRMatrix.from_dense(_sparse(5, 7, 0.5))
    h = m.to(torch.float16)
    assert h.dtype == torch.float16 and h.col_idx is m.col_idx
    torch.testing.assert_close(h.to_dense().float(), m.to_dense(), rtol=1e-3, atol=1e-3)


def _parts():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 4.0, 5.0]])
    m = CSRMatrix.from_dense(w)
    return m.values, m.row_ptr, m.col_idx


@pytest.mark.parametrize(
    "case, match",
    [
        ("values_2d", r"values: expected a 1-D floating-point tensor, got torch.float32 of shape"),
        ("values_int", r"values: expected a 1-D floating-point tensor, got torch.int64"),
        ("row_ptr_len", r"row_ptr: expected shape \[4\] \(rows \+ 1\), got \[3\]"),
        ("row_ptr_dtype", r"row_ptr: expected int32 or int64, got torch.float32"),
        ("row_ptr_end", r"row_ptr: expected to start at 0 and end at nnz=5, got 0 .. 4"),
        ("row_ptr_decrease", r"row_ptr: expected non-decreasing values"),
        ("col_range", r"col_idx: expected values in \[0, 4\), got \[0, 4\]"),
        ("col_unsorted", r"col_idx: expected strictly increasing columns within each row"),
        ("col_len", r"col_idx: expected shape \[5\] \(values' nnz\), got \[4\]"),
        ("col_dtype", r"col_idx: expected int16, int32 or int64, got torch.uint8"),
        ("shape", r"shape: expected \(rows, cols\), got 7"),
        ("not_tensor", r"values: expected a Tensor, got list"),
    ],
)
def test_validation_names_expected_and_got(case, match):
    v, rp, ci = _parts()
    shape = (3, 4)
    if case == "values_2d":
        v = v[:, None]
    elif case == "values_int":
        v = v.long()
    elif case == "row_ptr_len":
        rp = rp[:3]
    elif case == "row_ptr_dtype":
        rp = rp.float()
    elif case == "row_ptr_end":
        rp = rp.clone()
        rp[-1] = 4
    elif case == "row_ptr_decrease":
        rp = torch.tensor([0, 3, 2, 5], dtype=torch.int32)
    elif case == "col_range":
        ci = ci.clone()
        ci[-1] = 4
    elif case == "col_unsorted":
        ci = ci.clone()
        ci[0], ci[1] = ci[1].clone(), ci[0].clone()
    elif case == "col_len":
        ci = ci[:4]
    elif case == "col_dtype":
        ci = ci.to(torch.uint8)
    elif case == "shape":
        shape = 7
    elif case == "not_tensor":
        v = v.tolist()
    with pytest.raises(CSRFormatError, match=match):
        CSRMatrix(v, rp, ci, shape)


def test_a_new_row_may_restart_the_columns():
    """Columns fall where a row ends (row 0 ends at column 3, row 2 starts at column 0)."""
    v, rp, ci = _parts()
    m = CSRMatrix(v, rp, ci, (3, 4))
    assert m.col_idx.tolist() == [1, 3, 0, 2, 3]


def test_from_dense_errors():
    with pytest.raises(CSRFormatError, match=r"dense: expected a 2-D tensor, got \[3\]"):
        CSRMatrix.from_dense(torch.ones(3))
    with pytest.raises(CSRFormatError, match="mask: expected a torch.bool tensor, got torch.int64"):
        CSRMatrix.from_dense(torch.ones(2, 2), mask=torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(CSRFormatError, match=r"mask: expected shape \[2, 2\]"):
        CSRMatrix.from_dense(torch.ones(2, 2), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(CSRFormatError, match="csr: expected a torch.sparse_csr tensor"):
        CSRMatrix.from_sparse_csr(torch.ones(2, 2))
