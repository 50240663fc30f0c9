"""BlockSparseMatrix: a matrix stored as its kept ``bm x bk`` blocks only (block CSR plus the
transpose (CSC) metadata that the dX kernel needs).

For a Linear weight ``[out, in]`` the block grid is ``ceil(out / bm) x ceil(in / bk)``; a matrix
whose sizes are not multiples of the block is padded inside: the edge blocks are stored whole, with
zeros beyond the matrix (the kernels also bound-check, so padding never leaks into results).

Stored tensors (all on one device; ``nnz`` = number of stored blocks, ``R = ceil(rows / bm)``,
``C = ceil(cols / bk)``):

* ``values  [nnz, bm, bk]``  the blocks, in row-major block order (block row, then block column)
* ``row_ptr [R + 1]`` int32  blocks of block-row ``r`` are ``values[row_ptr[r]:row_ptr[r + 1]]``
* ``col_idx [nnz]``   int32  block column of each stored block (strictly increasing within a row)

Derived on construction (never saved; cheap: O(nnz + R + C)):

* ``block_row [nnz]`` int32  block row of each stored block (the dW kernel's program -> block)
* ``col_ptr [C + 1]``, ``t_row [nnz]``, ``t_perm [nnz]`` (int32): the transpose, i.e. blocks of
  block-column ``c`` are ``values[t_perm[col_ptr[c]:col_ptr[c + 1]]]`` with block rows ``t_row``.

Why both orders: the forward ``y = x W^T`` walks a block *row* of W per output tile, dX = dy W walks
a block *column*, and dW visits each stored block once. Storing ``t_perm`` instead of a transposed
copy of ``values`` keeps one copy of the weights (dX gathers blocks through ``t_perm``).

Block sizes: 16, 32, 64 or 128 per dimension (rectangular allowed). 16 is the smallest ``tl.dot``
operand size on NVIDIA GPUs; past 128 a block no longer fits a tile.
"""

from __future__ import annotations

import os

import torch

from sparsekern.formats._files import load_torch_checked, save_torch_checked

__all__ = [
    "BLOCK_SIZES",
    "BlockSparseFormatError",
    "BlockSparseMatrix",
    "block_grid",
    "block_occupancy",
    "block_size_pair",
]

BLOCK_SIZES = (16, 32, 64, 128)
_FORMAT = "sparsekern.BlockSparseMatrix/2"
# File layout (format 2): this magic, torch.save bytes of the state dict, SHA-256 of both.
_MAGIC = b"SKBSM\x02\n"


class BlockSparseFormatError(ValueError):
    """A BlockSparseMatrix (or its saved form) is inconsistent; the message says expected vs got."""


def block_size_pair(block_size) -> tuple[int, int]:
    """``block_size`` (an int or a pair of ints, each in :data:`BLOCK_SIZES`) as ``(bm, bk)``;
    raises :class:`BlockSparseFormatError` naming expected vs got (``16.9`` is refused, not
    truncated)."""
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    try:
        bm, bk = block_size
        if not all(isinstance(b, int) and not isinstance(b, bool) for b in (bm, bk)):
            raise TypeError
    except (TypeError, ValueError):
        raise BlockSparseFormatError(
            f"block_size: expected an int or a pair of ints from {BLOCK_SIZES}, got {block_size!r}"
        ) from None
    for b in (bm, bk):
        if b not in BLOCK_SIZES:
            raise BlockSparseFormatError(
                f"block_size: expected each of (bm, bk) in {BLOCK_SIZES}, got {(bm, bk)}"
            )
    return bm, bk


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_grid(shape: tuple[int, int], block_size: tuple[int, int]) -> tuple[int, int]:
    """``(ceil(rows / bm), ceil(cols / bk))``."""
    return _cdiv(shape[0], block_size[0]), _cdiv(shape[1], block_size[1])


def block_occupancy(mask: torch.Tensor, block_size) -> torch.Tensor:
    """``[R, C]`` bool: which ``bm x bk`` blocks of the 2-D ``mask`` hold any True (nonzero)."""
    bm, bk = block_size_pair(block_size)
    if mask.dim() != 2:
        raise BlockSparseFormatError(f"mask: expected a 2-D tensor, got shape {list(mask.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    rows, cols = m.shape
    R, C = block_grid((rows, cols), (bm, bk))
    m = torch.nn.functional.pad(m.view(torch.uint8), (0, C * bk - cols, 0, R * bm - rows))
    return m.view(R, bm, C, bk).amax(dim=(1, 3)).bool()


class BlockSparseMatrix:
    """A ``rows x cols`` matrix held as its stored ``bm x bk`` blocks.

    Build one with :meth:`from_dense` (or :meth:`from_sparse_bsr`, :meth:`load`); the constructor
    takes the stored parts and validates them (errors name expected vs got). ``values`` may be an
    ``nn.Parameter``: :func:`sparsekern.ops.block_sparse_linear` sends gradients to it, stored
    blocks only.

    Args:
        values: ``[nnz, bm, bk]`` floating point, any layout (stored contiguous: a copy when it
            is not).
        row_ptr: ``[ceil(rows / bm) + 1]`` integer, non-decreasing, from 0 to nnz.
        col_idx: ``[nnz]`` integer in ``[0, ceil(cols / bk))``, strictly increasing in each row.
        shape: ``(rows, cols)`` of the dense matrix.
        block_size: ``(bm, bk)``, each in 16, 32, 64, 128 (an int means square).
        validate: check everything (default). False skips the O(nnz) checks for parts that come
            from a matrix already validated (a cast of its values, a layout the kernels reuse).
    """

    def __init__(self, values, row_ptr, col_idx, shape, block_size, *, validate: bool = True):
        bm, bk = block_size_pair(block_size)
        try:
            rows, cols = (int(s) for s in shape)
        except (TypeError, ValueError):
            raise BlockSparseFormatError(f"shape: expected (rows, cols), got {shape!r}") from None
        self.shape = (rows, cols)
        self.block_size = (bm, bk)
        if validate:
            self._validate(values, row_ptr, col_idx)
        # The kernels address block p at p * bm * bk: values in another layout (a transposed or
        # expanded view, as from_sparse_bsr can produce) are stored contiguous, as a copy that
        # gradients still flow through.
        self.values = values if values.is_contiguous() else values.contiguous()
        self.row_ptr = row_ptr.to(torch.int32)
        self.col_idx = col_idx.to(torch.int32)
        self._derive()

    # -- validation ---------------------------------------------------------------------------
    def _validate(self, values, row_ptr, col_idx) -> None:
        (rows, cols), (bm, bk) = self.shape, self.block_size
        R, C = block_grid(self.shape, self.block_size)
        if rows < 0 or cols < 0:
            raise BlockSparseFormatError(f"shape: expected non-negative sizes, got {self.shape}")
        for name, t in (("values", values), ("row_ptr", row_ptr), ("col_idx", col_idx)):
            if not isinstance(t, torch.Tensor):
                raise BlockSparseFormatError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if not values.is_floating_point():
            raise BlockSparseFormatError(
                f"values: expected a floating-point dtype, got {values.dtype}"
            )
        if values.dim() != 3 or tuple(values.shape[1:]) != (bm, bk):
            raise BlockSparseFormatError(
                f"values: expected shape [nnz, {bm}, {bk}] for block_size {(bm, bk)}, got "
                f"{list(values.shape)}"
            )
        nnz = values.shape[0]
        for name, t, n in (("row_ptr", row_ptr, R + 1), ("col_idx", col_idx, nnz)):
            if t.dtype not in (torch.int32, torch.int64):
                raise BlockSparseFormatError(f"{name}: expected int32 or int64, got {t.dtype}")
            if t.dim() != 1 or t.numel() != n:
                raise BlockSparseFormatError(f"{name}: expected shape [{n}], got {list(t.shape)}")
        devices = {values.device, row_ptr.device, col_idx.device}
        if len(devices) != 1:
            raise BlockSparseFormatError(
                f"values, row_ptr, col_idx: expected one device, got values on {values.device}, "
                f"row_ptr on {row_ptr.device}, col_idx on {col_idx.device}"
            )
        rp = row_ptr.long().cpu()
        if rp[0] != 0 or rp[-1] != nnz:
            raise BlockSparseFormatError(
                f"row_ptr: expected to start at 0 and end at nnz={nnz}, got {int(rp[0])} .. "
                f"{int(rp[-1])}"
            )
        if (rp[1:] < rp[:-1]).any():
            raise BlockSparseFormatError("row_ptr: expected non-decreasing values, got a decrease")
        ci = col_idx.long().cpu()
        if nnz and (ci.min() < 0 or ci.max() >= C):
            raise BlockSparseFormatError(
                f"col_idx: expected values in [0, {C}) for {cols} columns at bk={bk}, got "
                f"[{int(ci.min())}, {int(ci.max())}]"
            )
        if nnz > 1:
            same_row = torch.repeat_interleave(torch.arange(R), rp[1:] - rp[:-1])
            step_ok = (ci[1:] > ci[:-1]) | (same_row[1:] != same_row[:-1])
            if not bool(step_ok.all()):
                raise BlockSparseFormatError(
                    "col_idx: expected strictly increasing block columns within each block row "
                    "(sorted, no duplicates), got an unsorted or repeated entry"
                )

    def _derive(self) -> None:
        R, C = block_grid(self.shape, self.block_size)
        dev = self.row_ptr.device
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        self.block_row = torch.repeat_interleave(
            torch.arange(R, device=dev, dtype=torch.int32), counts
        )
        col = self.col_idx.long()
        # Column-major order of the stored blocks; stable so rows stay increasing within a column.
        order = torch.argsort(col * max(R, 1) + self.block_row.long(), stable=True)
        self.t_perm = order.to(torch.int32)
        self.t_row = self.block_row[order]
        col_counts = torch.bincount(col, minlength=C) if col.numel() else col.new_zeros(C)
        self.col_ptr = torch.cat([col_counts.new_zeros(1), col_counts.cumsum(0)]).to(torch.int32)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: torch.Tensor, block_size=(32, 32), mask: torch.Tensor | None = None):
        """Keep the blocks of ``dense [rows, cols]`` that hold any nonzero, or, with ``mask`` (bool,
        ``dense``'s shape), any True; stored blocks hold ``where(mask, dense, 0)``: a pruned entry
        is zero whatever ``dense`` holds there (inf and NaN included)."""
        bm, bk = block_size_pair(block_size)
        if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
            got = list(dense.shape) if isinstance(dense, torch.Tensor) else type(dense).__name__
            raise BlockSparseFormatError(f"dense: expected a 2-D tensor, got {got}")
        if not dense.is_floating_point():
            raise BlockSparseFormatError(
                f"dense: expected a floating-point dtype, got {dense.dtype}"
            )
        if dense.device.type == "meta":  # which blocks hold a nonzero is data, which meta lacks
            raise BlockSparseFormatError(
                "dense: expected a tensor with data (cpu, cuda), got one on the meta device"
            )
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise BlockSparseFormatError(f"mask: expected a torch.bool tensor, got {got}")
            if mask.shape != dense.shape or mask.device != dense.device:
                raise BlockSparseFormatError(
                    f"mask: expected shape {list(dense.shape)} on {dense.device}, got "
                    f"{list(mask.shape)} on {mask.device}"
                )
            # where, not a product: a pruned entry holding inf or NaN is stored as 0 (inf * 0 is
            # NaN); the one semantics of non-finite values (where-semantics)
            dense = torch.where(
                mask, dense, torch.zeros((), dtype=dense.dtype, device=dense.device)
            )
            occ = block_occupancy(mask, (bm, bk))
        else:
            occ = block_occupancy(dense != 0, (bm, bk))
        rows, cols = dense.shape
        R, C = occ.shape
        padded = torch.nn.functional.pad(dense.detach(), (0, C * bk - cols, 0, R * bm - rows))
        blocks = padded.view(R, bm, C, bk).permute(0, 2, 1, 3)  # [R, C, bm, bk]
        r_idx, c_idx = occ.nonzero(as_tuple=True)  # row-major: sorted by row, then column
        values = blocks[r_idx, c_idx].contiguous()
        row_ptr = torch.cat([occ.new_zeros(1, dtype=torch.long), occ.sum(1).cumsum(0)])
        return cls(values, row_ptr, c_idx, (rows, cols), (bm, bk), validate=False)

    def to_dense(self) -> torch.Tensor:
        """``[rows, cols]`` in ``values``' dtype; differentiable with respect to ``values``."""
        (rows, cols), (bm, bk) = self.shape, self.block_size
        R, C = block_grid(self.shape, self.block_size)
        grid = self.values.new_zeros(R, C, bm, bk)
        grid = grid.index_put((self.block_row.long(), self.col_idx.long()), self.values)
        return grid.permute(0, 2, 1, 3).reshape(R * bm, C * bk)[:rows, :cols]

    def block_mask(self) -> torch.Tensor:
        """``[R, C]`` bool: the stored blocks."""
        R, C = block_grid(self.shape, self.block_size)
        occ = torch.zeros(R, C, dtype=torch.bool, device=self.values.device)
        occ[self.block_row.long(), self.col_idx.long()] = True
        return occ

    def to_mask(self) -> torch.Tensor:
        """``[rows, cols]`` bool: True inside stored blocks."""
        (rows, cols), (bm, bk) = self.shape, self.block_size
        occ = self.block_mask()
        return occ.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:rows, :cols]

    # -- torch.sparse_bsr ----------------------------------------------------------------------
    def to_sparse_bsr(self) -> torch.Tensor:
        """A ``torch.sparse_bsr`` tensor with the same blocks. torch's BSR needs sizes that are
        multiples of the block, so a matrix with padding gives the padded size
        ``[R * bm, C * bk]`` (its extra rows and columns are zero)."""
        R, C = block_grid(self.shape, self.block_size)
        bm, bk = self.block_size
        return torch.sparse_bsr_tensor(
            self.row_ptr.long(),
            self.col_idx.long(),
            self.values.detach(),
            size=(R * bm, C * bk),
            check_invariants=False,  # validated on construction
        )

    @classmethod
    def from_sparse_bsr(cls, bsr: torch.Tensor, shape: tuple[int, int] | None = None):
        """From a 2-D ``torch.sparse_bsr`` tensor; ``shape`` crops its padding (default: its size).
        All its stored blocks are kept (explicit zero blocks too)."""
        if not isinstance(bsr, torch.Tensor) or bsr.layout != torch.sparse_bsr:
            got = bsr.layout if isinstance(bsr, torch.Tensor) else type(bsr).__name__
            raise BlockSparseFormatError(f"bsr: expected a torch.sparse_bsr tensor, got {got}")
        values = bsr.values()
        if values.dim() != 3:
            raise BlockSparseFormatError(
                f"bsr: expected a 2-D BSR tensor with [nnz, bm, bk] values, got values of shape "
                f"{list(values.shape)}"
            )
        bm, bk = values.shape[1:]
        size = tuple(bsr.shape)
        shape = size if shape is None else tuple(shape)
        if len(shape) != 2 or not (
            size[0] - bm < shape[0] <= size[0] and size[1] - bk < shape[1] <= size[1]
        ):
            raise BlockSparseFormatError(
                f"shape: expected rows in ({size[0] - bm}, {size[0]}] and cols in "
                f"({size[1] - bk}, {size[1]}] for a BSR tensor of size {list(size)}, got {shape}"
            )
        return cls(values, bsr.crow_indices(), bsr.col_indices(), shape, (bm, bk))

    # -- properties ----------------------------------------------------------------------------
    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        """Stored fraction of the block grid (stored blocks / all blocks), in [0, 1]."""
        R, C = block_grid(self.shape, self.block_size)
        return self.nnz_blocks / (R * C) if R * C else 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, *args, **kwargs) -> BlockSparseMatrix:
        """A copy with ``values`` moved/cast by ``Tensor.to``; metadata follows the device."""
        values = self.values.to(*args, **kwargs)
        dev = values.device
        return BlockSparseMatrix(
            values,
            self.row_ptr.to(dev),
            self.col_idx.to(dev),
            self.shape,
            self.block_size,
            validate=False,
        )

    def __repr__(self) -> str:
        return (
            f"BlockSparseMatrix(shape={self.shape}, block_size={self.block_size}, "
            f"nnz_blocks={self.nnz_blocks}, density={self.density:.4f}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    # -- state dict, save, load ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors only (loadable with ``torch.load(weights_only=True)``): ``values``,
        ``row_ptr``, ``col_idx``, ``shape`` and ``block_size`` (int64 pairs)."""
        return {
            "values": self.values.detach(),
            "row_ptr": self.row_ptr,
            "col_idx": self.col_idx,
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "block_size": torch.tensor(self.block_size, dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> BlockSparseMatrix:
        """Inverse of :meth:`state_dict`; validates everything."""
        need = ("values", "row_ptr", "col_idx", "shape", "block_size")
        if not isinstance(state, dict) or any(k not in state for k in need):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise BlockSparseFormatError(f"state: expected keys {list(need)}, got {got}")
        shape = tuple(int(s) for s in state["shape"].tolist())
        block = tuple(int(b) for b in state["block_size"].tolist())
        return cls(state["values"], state["row_ptr"], state["col_idx"], shape, block)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file in the same directory, then ``os.replace``; one left
        by a killed save is removed by the next), with a SHA-256 checksum that :meth:`load`
        verifies before parsing."""
        save_torch_checked({"format": _FORMAT, **self.state_dict()}, path, _MAGIC)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location=None) -> BlockSparseMatrix:
        """Read a file written by :meth:`save`: checksum verified (a flipped bit anywhere is
        refused), parsed with ``torch.load(weights_only=True)``, validated."""
        try:
            state = load_torch_checked(path, _MAGIC, "BlockSparseMatrix", map_location)
        except Exception as e:
            raise BlockSparseFormatError(
                f"{path}: expected a BlockSparseMatrix file, could not read it ({e})"
            ) from e
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise BlockSparseFormatError(f"{path}: expected format {_FORMAT!r}, got {got!r}")
        return cls.from_state_dict({k: v for k, v in state.items() if k != "format"})
