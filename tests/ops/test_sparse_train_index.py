"""The CSR index of a mask: correct for odd shapes and densities, validated, and never stale."""

from __future__ import annotations

import pytest
import torch

from sparsekern.ops._mask_cache import cached_bytes, stale_tags
from sparsekern.ops.sparse_train import MaskIndex, build_index, mask_index


def _dense_csr(mask2d):
    rows, cols = mask2d.nonzero(as_tuple=True)
    return rows, cols


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 5), (6, 3, 3, 3)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_index_matches_nonzero(shape, density):
    g = torch.Generator().manual_seed(hash((shape, density)) % 2**31)
    mask = torch.rand(shape, generator=g) < density
    idx = build_index(mask).validate()
    n = shape[0]
    m2 = mask.reshape(n, -1)
    k = m2.shape[1]
    rows, cols = _dense_csr(m2)
    assert idx.shape == (n, k) and idx.weight_shape == tuple(shape)
    assert idx.nnz == int(mask.sum())
    assert torch.equal(idx.col_idx.long(), cols)
    assert torch.equal(idx.rows(), rows)
    assert torch.equal(idx.flat_idx, rows * k + cols)
    assert torch.equal(torch.diff(idx.row_ptr.long()), m2.sum(1))
    # the transpose: column-major order of the same entries
    t_cols, t_rows = m2.t().nonzero(as_tuple=True)
    assert torch.equal(idx.t_col_idx.long(), t_rows)
    assert torch.equal(idx.col_idx.long()[idx.t_perm], t_cols)
    assert torch.equal(idx.to_mask(), mask)
    w = torch.randn(shape, generator=g)
    assert torch.equal(idx.scatter(idx.gather(w)), w * mask)
    # a torch CSR built from it is W's CSR
    csr = torch.sparse_csr_tensor(idx.row_ptr, idx.col_idx, idx.gather(w), (n, k))
    assert torch.equal(csr.to_dense(), (w * mask).reshape(n, k))
    csr_t = torch.sparse_csr_tensor(idx.t_row_ptr, idx.t_col_idx, idx.gather(w)[idx.t_perm], (k, n))
    assert torch.equal(csr_t.to_dense(), (w * mask).reshape(n, k).t())


def test_cache_follows_every_mask_change():
    mask = torch.rand(9, 11) < 0.5
    first = mask_index(mask)
    assert mask_index(mask) is first  # a hit
    mask[2, 3] = not bool(mask[2, 3])  # in-place edit: version bump
    second = mask_index(mask)
    assert second is not first and torch.equal(second.to_mask(), mask)
    mask &= torch.rand(9, 11) < 0.5
    assert torch.equal(mask_index(mask).to_mask(), mask)
    mask.copy_(torch.ones_like(mask))  # what set_mask does
    assert mask_index(mask).nnz == 99
    other = mask.clone()  # a new buffer with the same contents is another object
    assert mask_index(other) is not mask_index(mask)
    assert cached_bytes(mask) >= mask_index(mask).nbytes() > 0
    assert stale_tags(mask) == []
    mask.data[0, 0] = False  # bypasses the version counter: found by stale_tags
    assert "sparse_train.index" in stale_tags(mask)


def test_errors_name_expected_and_got():
    with pytest.raises(TypeError, match="expected dtype torch.bool, got torch.float32"):
        mask_index(torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"expected at least 2 dims.*got \[4\]"):
        mask_index(torch.ones(4, dtype=torch.bool))
    idx = build_index(torch.rand(5, 4) < 0.5)
    args = [idx.row_ptr, idx.col_idx, idx.flat_idx, idx.t_row_ptr, idx.t_col_idx, idx.t_perm]
    bad = list(args)
    bad[0] = idx.row_ptr.long()
    with pytest.raises(ValueError, match="row_ptr.dtype: expected torch.int32, got torch.int64"):
        MaskIndex((5, 4), *bad)
    bad = list(args)
    bad[0] = idx.row_ptr[:-1].contiguous()
    with pytest.raises(ValueError, match=r"row_ptr.shape: expected \[6\], got \[5\]"):
        MaskIndex((5, 4), *bad)
    bad = list(args)
    bad[5] = idx.t_perm.flip(0).contiguous()
    if idx.nnz > 1:
        with pytest.raises(ValueError, match="transpose"):
            MaskIndex((5, 4), *bad).validate()
    with pytest.raises(ValueError, match=r"weight.shape: expected \[5, 4\], got \[4, 5\]"):
        idx.gather(torch.zeros(4, 5))
