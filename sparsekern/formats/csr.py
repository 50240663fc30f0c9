"""CSRMatrix: a matrix stored as its kept entries, row by row (compressed sparse rows), with narrow
column indices: what unstructured (Han et al.) masks export to.

Stored tensors (one device; ``nnz`` = number of stored entries):

* ``values  [nnz]``        floating point, row-major order (row, then column)
* ``row_ptr [rows + 1]``   int32, or int64 once ``nnz >= 2^31``: entries of row ``r`` are
  ``values[row_ptr[r]:row_ptr[r + 1]]``
* ``col_idx [nnz]``        int16 while ``cols <= 32768`` (every AlexNet / VGG-16 FC layer: 9216 and
  25088 inputs), else int32; strictly increasing within each row

Why int16: the GPU kernel (``sparsekern.ops.csr_linear``) is bandwidth-bound, and an entry costs
``itemsize + 2`` bytes instead of ``itemsize + 4``: 4 instead of 6 bytes per bf16 entry, so a
10%-dense layer moves 0.4 bytes per weight against 2 for the dense bf16 matrix (5x fewer).

The interchange is torch's own CSR (:meth:`to_sparse_csr`, :meth:`from_sparse_csr`): torch's CPU
CSR product is MKL's and takes int32 or int64 indices (int32 here: MKL converts int64 indices on
every call, which measured 2x slower at batch 1 on a 9216 x 4096 layer).
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["INT16_MAX_COLS", "CSRFormatError", "CSRMatrix", "csr_index_dtype"]

# int16 holds column indices 0..32767.
INT16_MAX_COLS = 2**15
_INT32_MAX = 2**31 - 1


class CSRFormatError(ValueError):
    """A CSRMatrix is inconsistent; the message says expected vs got."""


def csr_index_dtype(cols: int) -> torch.dtype:
    """The column-index dtype for a matrix with ``cols`` columns: int16 up to 32768, else int32."""
    return torch.int16 if cols <= INT16_MAX_COLS else torch.int32


def _shape_pair(shape) -> tuple[int, int]:
    try:
        rows, cols = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise CSRFormatError(f"shape: expected (rows, cols), got {shape!r}") from None
    if rows < 0 or cols < 0:
        raise CSRFormatError(f"shape: expected non-negative sizes, got {(rows, cols)}")
    return rows, cols


class CSRMatrix:
    """A ``rows x cols`` matrix held as its stored entries (CSR, narrow column indices).

    Build one with :meth:`from_dense` (or :meth:`from_sparse_csr`, :meth:`from_state_dict`); the
    constructor takes the stored parts and validates them (errors name expected vs got).
    ``values`` may be an ``nn.Parameter``: :func:`sparsekern.ops.csr_linear` sends gradients to
    it, stored entries only.

    Args:
        values: ``[nnz]`` floating point.
        row_ptr: ``[rows + 1]`` int32 or int64, non-decreasing, from 0 to nnz.
        col_idx: ``[nnz]`` int16, int32 or int64 in ``[0, cols)``, strictly increasing in each
            row (kept as given; :meth:`from_dense` picks :func:`csr_index_dtype`).
        shape: ``(rows, cols)`` of the dense matrix.
    """

    def __init__(self, values, row_ptr, col_idx, shape, *, validate: bool = True):
        self.shape = _shape_pair(shape)
        if validate:
            self._check(values, row_ptr, col_idx)
        self.values = values
        self.row_ptr = row_ptr
        self.col_idx = col_idx

    # -- validation ---------------------------------------------------------------------------
    def _check(self, values, row_ptr, col_idx) -> None:
        rows, cols = self.shape
        for name, t in (("values", values), ("row_ptr", row_ptr), ("col_idx", col_idx)):
            if not isinstance(t, torch.Tensor):
                raise CSRFormatError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if not values.is_floating_point() or values.dim() != 1:
            raise CSRFormatError(
                f"values: expected a 1-D floating-point tensor, got {values.dtype} of shape "
                f"{list(values.shape)}"
            )
        nnz = values.numel()
        if row_ptr.dtype not in (torch.int32, torch.int64):
            raise CSRFormatError(f"row_ptr: expected int32 or int64, got {row_ptr.dtype}")
        if row_ptr.dtype == torch.int32 and nnz > _INT32_MAX:
            raise CSRFormatError(f"row_ptr: expected int64 for nnz={nnz} >= 2^31, got int32")
        if row_ptr.dim() != 1 or row_ptr.numel() != rows + 1:
            raise CSRFormatError(
                f"row_ptr: expected shape [{rows + 1}] (rows + 1), got {list(row_ptr.shape)}"
            )
        if col_idx.dtype not in (torch.int16, torch.int32, torch.int64):
            raise CSRFormatError(f"col_idx: expected int16, int32 or int64, got {col_idx.dtype}")
        if col_idx.dtype == torch.int16 and cols > INT16_MAX_COLS:
            raise CSRFormatError(
                f"col_idx: expected int32 for {cols} columns (int16 holds {INT16_MAX_COLS}), got "
                "int16"
            )
        if col_idx.dim() != 1 or col_idx.numel() != nnz:
            raise CSRFormatError(
                f"col_idx: expected shape [{nnz}] (values' nnz), got {list(col_idx.shape)}"
            )
        devices = {values.device, row_ptr.device, col_idx.device}
        if len(devices) != 1:
            raise CSRFormatError(
                f"values, row_ptr, col_idx: expected one device, got values on {values.device}, "
                f"row_ptr on {row_ptr.device}, col_idx on {col_idx.device}"
            )
        rp = row_ptr.long()
        if int(rp[0]) != 0 or int(rp[-1]) != nnz:
            raise CSRFormatError(
                f"row_ptr: expected to start at 0 and end at nnz={nnz}, got {int(rp[0])} .. "
                f"{int(rp[-1])}"
            )
        if bool((rp[1:] < rp[:-1]).any()):
            raise CSRFormatError("row_ptr: expected non-decreasing values, got a decrease")
        if nnz:
            ci = col_idx.long()
            lo, hi = int(ci.min()), int(ci.max())
            if lo < 0 or hi >= cols:
                raise CSRFormatError(f"col_idx: expected values in [0, {cols}), got [{lo}, {hi}]")
            if nnz > 1:
                # a step that is not increasing is allowed only where a new row starts
                row_start = torch.zeros(nnz, dtype=torch.bool, device=ci.device)
                starts = rp[1:-1]
                row_start[starts[starts < nnz]] = True
                bad = (ci[1:] <= ci[:-1]) & ~row_start[1:]
                if bool(bad.any()):
                    raise CSRFormatError(
                        "col_idx: expected strictly increasing columns within each row (sorted, "
                        "no duplicates), got an unsorted or repeated entry"
                    )

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        mask: torch.Tensor | None = None,
        index_dtype: torch.dtype | None = None,
    ) -> CSRMatrix:
        """The entries of ``dense [rows, cols]`` that are nonzero, or with ``mask`` (bool, same
        shape) the entries where it is True (stored as ``dense`` there, explicit zeros included).

        ``index_dtype``: the column-index dtype, default :func:`csr_index_dtype` (int16 up to
        32768 columns)."""
        if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
            got = list(dense.shape) if isinstance(dense, torch.Tensor) else type(dense).__name__
            raise CSRFormatError(f"dense: expected a 2-D tensor, got {got}")
        if not dense.is_floating_point():
            raise CSRFormatError(f"dense: expected a floating-point dtype, got {dense.dtype}")
        if dense.device.type == "meta":  # which entries are kept is data, which meta lacks
            raise CSRFormatError(
                "dense: expected a tensor with data (cpu, cuda), got one on the meta device"
            )
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise CSRFormatError(f"mask: expected a torch.bool tensor, got {got}")
            if mask.shape != dense.shape or mask.device != dense.device:
                raise CSRFormatError(
                    f"mask: expected shape {list(dense.shape)} on {dense.device}, got "
                    f"{list(mask.shape)} on {mask.device}"
                )
            keep = mask
        else:
            keep = dense != 0
        rows, cols = dense.shape
        idx = index_dtype or csr_index_dtype(cols)
        if idx not in (torch.int16, torch.int32, torch.int64):
            raise CSRFormatError(f"index_dtype: expected int16, int32 or int64, got {idx}")
        dense = dense.detach()
        r, c = keep.nonzero(as_tuple=True)  # row-major: sorted by row, then column
        values = dense[r, c].contiguous()
        counts = torch.bincount(r, minlength=rows) if rows else r.new_zeros(0)
        nnz = values.numel()
        ptr_dtype = torch.int64 if nnz > _INT32_MAX else torch.int32
        row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(ptr_dtype)
        m = cls(values, row_ptr, c.to(idx), (rows, cols), validate=False)
        m._check(m.values, m.row_ptr, m.col_idx)  # catches int16 for > 32768 columns
        return m

    def to_dense(self) -> torch.Tensor:
        """``[rows, cols]`` in ``values``' dtype; differentiable with respect to ``values``."""
        rows, cols = self.shape
        out = self.values.new_zeros(rows * cols)
        flat = self.row_indices().long() * cols + self.col_idx.long()
        return out.index_put((flat,), self.values, accumulate=True).view(rows, cols)

    def row_indices(self) -> torch.Tensor:
        """``[nnz]`` int32 (int64 past 2^31 rows): the row of each stored entry (derived, not
        stored: 4 more bytes per entry)."""
        rows = self.shape[0]
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        dt = torch.int32 if rows <= _INT32_MAX else torch.int64
        ar = torch.arange(rows, device=self.row_ptr.device, dtype=dt)
        return torch.repeat_interleave(ar, counts, output_size=self.nnz)

    def to_mask(self) -> torch.Tensor:
        """``[rows, cols]`` bool: True at stored entries."""
        rows, cols = self.shape
        m = torch.zeros(rows, cols, dtype=torch.bool, device=self.device)
        m[self.row_indices().long(), self.col_idx.long()] = True
        return m

    # -- torch.sparse_csr ----------------------------------------------------------------------
    def to_sparse_csr(self, index_dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """A ``torch.sparse_csr`` tensor with the same entries (its values alias ``values``,
        detached) and ``index_dtype`` indices (int32 or int64; int32 is what MKL takes without a
        per-call conversion)."""
        if index_dtype not in (torch.int32, torch.int64):
            raise CSRFormatError(f"index_dtype: expected int32 or int64, got {index_dtype}")
        if index_dtype == torch.int32 and self.nnz > _INT32_MAX:
            index_dtype = torch.int64
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                self.row_ptr.to(index_dtype),
                self.col_idx.to(index_dtype),
                self.values.detach(),
                size=self.shape,
                check_invariants=False,  # validated on construction
            )

    @classmethod
    def from_sparse_csr(cls, csr: torch.Tensor, index_dtype: torch.dtype | None = None):
        """From a 2-D ``torch.sparse_csr`` tensor (its stored entries, explicit zeros included;
        validated); ``index_dtype`` as in :meth:`from_dense`."""
        if not isinstance(csr, torch.Tensor) or csr.layout != torch.sparse_csr:
            got = csr.layout if isinstance(csr, torch.Tensor) else type(csr).__name__
            raise CSRFormatError(f"csr: expected a torch.sparse_csr tensor, got {got}")
        if csr.dim() != 2 or csr.values().dim() != 1:
            raise CSRFormatError(
                f"csr: expected a 2-D CSR tensor with scalar values, got shape {list(csr.shape)} "
                f"with values of shape {list(csr.values().shape)}"
            )
        rows, cols = csr.shape
        nnz = csr.values().numel()
        idx = index_dtype or csr_index_dtype(cols)
        ptr = torch.int64 if nnz > _INT32_MAX else torch.int32
        return cls(
            csr.values(), csr.crow_indices().to(ptr), csr.col_indices().to(idx), (rows, cols)
        )

    # -- properties ----------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        """Stored fraction of the matrix, in [0, 1]."""
        rows, cols = self.shape
        return self.nnz / (rows * cols) if rows * cols else 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def nbytes(self) -> int:
        """Bytes of the stored tensors (values + row_ptr + col_idx)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.row_ptr, self.col_idx))

    def to(self, *args, **kwargs) -> CSRMatrix:
        """A copy with ``values`` moved/cast by ``Tensor.to``; the indices follow the device."""
        values = self.values.to(*args, **kwargs)
        dev = values.device
        return CSRMatrix(
            values, self.row_ptr.to(dev), self.col_idx.to(dev), self.shape, validate=False
        )

    def __repr__(self) -> str:
        return (
            f"CSRMatrix(shape={self.shape}, nnz={self.nnz}, density={self.density:.4f}, "
            f"dtype={self.dtype}, index_dtype={self.col_idx.dtype}, device={self.device})"
        )

    # -- state dict ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors only (loadable with ``torch.load(weights_only=True)``): ``values``,
        ``row_ptr``, ``col_idx``, ``shape`` (int64 pair)."""
        return {
            "values": self.values.detach(),
            "row_ptr": self.row_ptr,
            "col_idx": self.col_idx,
            "shape": torch.tensor(self.shape, dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> CSRMatrix:
        """Inverse of :meth:`state_dict`; validates everything."""
        need = ("values", "row_ptr", "col_idx", "shape")
        if not isinstance(state, dict) or any(k not in state for k in need):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CSRFormatError(f"state: expected keys {list(need)}, got {got}")
        shape = state["shape"]
        shape = tuple(int(s) for s in shape.tolist()) if isinstance(shape, torch.Tensor) else shape
        return cls(state["values"], state["row_ptr"], state["col_idx"], shape)
