"""BlockSparseMatrix: construction, validation (errors name expected vs got), round trips through
dense, torch.sparse_bsr, state dicts and files, and the transpose metadata the dX kernel reads."""

import pytest
import torch

from sparsekern.formats.block_sparse import (
    BlockSparseFormatError,
    BlockSparseMatrix,
    block_grid,
    block_occupancy,
)

SHAPES = [(70, 50), (16, 16), (1, 1), (130, 257)]
BLOCKS = [(16, 16), (32, 16), (16, 64), (64, 64), (128, 32)]


def _sparse_dense(shape, block, keep=0.4, device="cpu"):
    R, C = block_grid(shape, block)
    occ = torch.rand(R, C, device=device) < keep
    occ.view(-1)[0] = True
    bm, bk = block
    m = occ.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[: shape[0], : shape[1]]
    return torch.randn(shape, device=device) * m, occ


@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_from_dense_round_trip(shape, block, device):
    dense, occ = _sparse_dense(shape, block, device=device)
    W = BlockSparseMatrix.from_dense(dense, block)
    assert W.shape == shape and W.block_size == block
    assert W.values.shape == (int(occ.sum()), *block)
    torch.testing.assert_close(W.to_dense(), dense, rtol=0, atol=0)
    assert torch.equal(W.block_mask(), occ)
    assert W.density == pytest.approx(occ.float().mean().item())
    bm, bk = block
    expanded = occ.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[: shape[0], : shape[1]]
    assert torch.equal(W.to_mask(), expanded)


def test_mask_keeps_blocks_with_any_true_even_if_values_are_zero(device):
    dense = torch.zeros(40, 40, device=device)
    mask = torch.zeros(40, 40, dtype=torch.bool, device=device)
    mask[17, 33] = True  # block (1, 2) at 16x16
    dense[0, 0] = 5.0  # block (0, 0) holds a value but the mask drops it
    W = BlockSparseMatrix.from_dense(dense, (16, 16), mask=mask)
    assert W.nnz_blocks == 1
    assert (int(W.block_row[0]), int(W.col_idx[0])) == (1, 2)
    assert (W.to_dense() == 0).all()


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_transpose_metadata(block, device):
    dense, occ = _sparse_dense((150, 170), block, device=device)
    W = BlockSparseMatrix.from_dense(dense, block)
    R, C = occ.shape
    assert W.col_ptr.tolist() == [0, *occ.sum(0).cumsum(0).tolist()]
    for c in range(C):
        lo, hi = int(W.col_ptr[c]), int(W.col_ptr[c + 1])
        rows = W.t_row[lo:hi].tolist()
        assert rows == occ[:, c].nonzero().flatten().tolist(), f"column {c}: rows {rows}"
        perm = W.t_perm[lo:hi].long()
        assert (W.col_idx[perm] == c).all() and W.block_row[perm].tolist() == rows
    assert W.row_ptr.dtype == W.col_idx.dtype == W.t_perm.dtype == torch.int32


def test_sparse_bsr_round_trip(device):
    dense, occ = _sparse_dense((64, 96), (32, 16), device=device)
    W = BlockSparseMatrix.from_dense(dense, (32, 16))
    bsr = W.to_sparse_bsr()
    assert bsr.layout == torch.sparse_bsr
    torch.testing.assert_close(bsr.to_dense(), dense, rtol=0, atol=0)
    # torch's own conversion gives the same blocks
    ref = dense.to_sparse_bsr((32, 16))
    assert torch.equal(ref.crow_indices(), bsr.crow_indices())
    back = BlockSparseMatrix.from_sparse_bsr(ref)
    torch.testing.assert_close(back.to_dense(), dense, rtol=0, atol=0)


def test_sparse_bsr_of_ragged_matrix_is_padded_and_crops_back(device):
    dense, _ = _sparse_dense((70, 50), (16, 16), device=device)
    W = BlockSparseMatrix.from_dense(dense, (16, 16))
    bsr = W.to_sparse_bsr()
    assert tuple(bsr.shape) == (80, 64)
    assert (bsr.to_dense()[70:] == 0).all() and (bsr.to_dense()[:, 50:] == 0).all()
    back = BlockSparseMatrix.from_sparse_bsr(bsr, shape=(70, 50))
    torch.testing.assert_close(back.to_dense(), dense, rtol=0, atol=0)
    with pytest.raises(BlockSparseFormatError, match=r"rows in \(64, 80\].*got \(60, 50\)"):
        BlockSparseMatrix.from_sparse_bsr(bsr, shape=(60, 50))


def test_state_dict_save_load_round_trip(tmp_path, device):
    dense, _ = _sparse_dense((70, 50), (16, 32), device=device)
    W = BlockSparseMatrix.from_dense(dense.half(), (16, 32))
    W2 = BlockSparseMatrix.from_state_dict(W.state_dict())
    assert torch.equal(W2.to_dense(), W.to_dense())
    path = tmp_path / "w.bsm"
    W.save(path)
    W3 = BlockSparseMatrix.load(path)
    assert W3.values.dtype == torch.float16 and W3.shape == (70, 50)
    assert W3.block_size == (16, 32)
    assert torch.equal(W3.to_dense().to(device), W.to_dense())
    assert [p.name for p in tmp_path.iterdir()] == ["w.bsm"], "temporary file left behind"


def test_load_rejects_truncated_and_foreign_files(tmp_path):
    W = BlockSparseMatrix.from_dense(torch.randn(40, 40), (16, 16))
    path = tmp_path / "w.bsm"
    W.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.bsm").write_bytes(data[: len(data) // 2])
    with pytest.raises(BlockSparseFormatError, match="expected a BlockSparseMatrix file"):
        BlockSparseMatrix.load(tmp_path / "cut.bsm")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(BlockSparseFormatError, match=r"expected a file starting with"):
        BlockSparseMatrix.load(tmp_path / "other.pt")


def test_every_flipped_bit_is_refused(tmp_path):
    """A SHA-256 trailer: no single-bit flip anywhere in the file loads (200 flips drawn over the
    whole file; before the checksum 115 of 200 loaded different values with no error)."""
    W = BlockSparseMatrix.from_dense(torch.randn(40, 40) * (torch.rand(40, 40) < 0.5), (16, 16))
    path = tmp_path / "w.bsm"
    W.save(path)
    data = bytearray(path.read_bytes())
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, len(data) * 8, (200,), generator=g).tolist()
    for bit in bits:
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        bad = tmp_path / "flipped.bsm"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(BlockSparseFormatError):
            BlockSparseMatrix.load(bad)
    assert torch.equal(BlockSparseMatrix.load(path).to_dense(), W.to_dense())


def test_a_killed_save_leaves_nothing_behind_after_the_next(tmp_path, monkeypatch):
    import os
    import time

    W = BlockSparseMatrix.from_dense(torch.randn(32, 32), 16)
    path = tmp_path / "w.bsm"
    stale = tmp_path / ".w.bsm.abc123.tmp"  # what a SIGKILL during save leaves
    stale.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    W.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bsm"]
    # a save that fails half way removes its own temporary file
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        W.save(tmp_path / "x.bsm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bsm"]


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_values_in_any_layout_are_stored_contiguous(layout, device):
    """Non-contiguous or expanded values (what from_sparse_bsr can produce) once gave errors of
    23-45 or reads past storage: they are stored contiguous and give the dense result."""
    dense, _ = _sparse_dense((48, 32), (16, 16), device=device)
    W = BlockSparseMatrix.from_dense(dense, 16)
    if layout == "transposed":
        v = W.values.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        v = W.values[:1].expand(W.nnz_blocks, 16, 16)
    assert not v.is_contiguous()
    W2 = BlockSparseMatrix(v, W.row_ptr, W.col_idx, W.shape, 16)
    assert W2.values.is_contiguous()
    x = torch.randn(5, 32, device=device)
    from sparsekern.ops import block_sparse_linear

    torch.testing.assert_close(block_sparse_linear(x, W2), x @ W2.to_dense().t())


def test_density_of_empty_and_full(device):
    assert BlockSparseMatrix.from_dense(torch.zeros(33, 20, device=device), 16).density == 0.0
    assert BlockSparseMatrix.from_dense(torch.ones(33, 20, device=device), 16).density == 1.0
    assert BlockSparseMatrix.from_dense(torch.zeros(33, 20, device=device), 16).nnz_blocks == 0


def test_block_occupancy(device):
    m = torch.zeros(20, 35, dtype=torch.bool, device=device)
    m[19, 34] = True
    occ = block_occupancy(m, (16, 16))
    assert occ.shape == (2, 3) and occ.sum() == 1 and occ[1, 2]


def _parts(device="cpu"):
    W = BlockSparseMatrix.from_dense(torch.randn(40, 40, device=device), (16, 16))
    return W.values, W.row_ptr, W.col_idx


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(block_size=(24, 16)), r"each of \(bm, bk\) in \(16, 32, 64, 128\), got \(24, 16\)"),
        (dict(block_size="big"), "an int or a pair of ints"),
        (dict(values=torch.randn(9, 16, 32)), r"\[nnz, 16, 16\].*got \[9, 16, 32\]"),
        (dict(values=torch.ones(9, 16, 16, dtype=torch.int32)), "floating-point dtype"),
        (dict(row_ptr=torch.tensor([0, 3, 6])), r"row_ptr: expected shape \[4\], got \[3\]"),
        (dict(row_ptr=torch.tensor([0, 3, 6, 8])), "end at nnz=9, got 0 .. 8"),
        (dict(row_ptr=torch.tensor([0, 5, 4, 9])), "non-decreasing"),
        (dict(row_ptr=torch.tensor([0.0, 3, 6, 9])), "int32 or int64, got torch.float32"),
        (dict(col_idx=torch.tensor([0, 1, 3, 0, 1, 2, 0, 1, 2])), r"\[0, 3\).*got \[0, 3\]"),
        (dict(col_idx=torch.tensor([0, 2, 1, 0, 1, 2, 0, 1, 2])), "strictly increasing"),
        (dict(col_idx=torch.tensor([0, 0, 1, 0, 1, 2, 0, 1, 2])), "strictly increasing"),
        (dict(shape=(40,)), r"expected \(rows, cols\)"),
    ],
)
def test_validation_errors(change, match):
    values, row_ptr, col_idx = _parts()
    args = dict(values=values, row_ptr=row_ptr, col_idx=col_idx, shape=(40, 40), block_size=16)
    args.update(change)
    with pytest.raises(BlockSparseFormatError, match=match):
        BlockSparseMatrix(**args)


def test_from_dense_errors():
    with pytest.raises(BlockSparseFormatError, match=r"2-D tensor, got \[4, 4, 4\]"):
        BlockSparseMatrix.from_dense(torch.randn(4, 4, 4), 16)
    with pytest.raises(BlockSparseFormatError, match="torch.bool tensor, got torch.float32"):
        BlockSparseMatrix.from_dense(torch.randn(4, 4), 16, mask=torch.ones(4, 4))
    with pytest.raises(BlockSparseFormatError, match=r"shape \[4, 4\].*got \[4, 5\]"):
        BlockSparseMatrix.from_dense(torch.randn(4, 4), 16, mask=torch.ones(4, 5, dtype=torch.bool))


def test_to_moves_and_casts(device):
    W = BlockSparseMatrix.from_dense(torch.randn(40, 40), (16, 16))
    W2 = W.to(device=device, dtype=torch.bfloat16)
    assert W2.values.dtype == torch.bfloat16 and W2.row_ptr.device.type == device.type
    assert "nnz_blocks=9" in repr(W)
