"""The CSR index of a bool mask, and its transpose, built once per mask change.

A weight ``W [N, K]`` (a conv weight ``[C_out, C_in/groups, kh, kw]`` is read as
``[C_out, C_in/groups * kh * kw]``) keeps the entries where ``mask`` is True. Its kept values
``values [nnz]`` are ``W.reshape(-1)[index.flat_idx]``, in row-major order. :class:`MaskIndex`
holds, for that order:

* ``row_ptr [N+1]`` int32, ``col_idx [nnz]`` int32: standard CSR (row ``n`` holds entries
  ``row_ptr[n]:row_ptr[n+1]``, with columns ascending). The forward ``y = x W^T`` reads these.
* ``flat_idx [nnz]`` int64: ``row * K + col`` of each kept entry (gather/scatter between the
  dense weight and ``values``).
* ``t_row_ptr [K+1]`` int32, ``t_col_idx [nnz]`` int32, ``t_perm [nnz]`` int64: the CSR of
  ``W^T`` (CSC of ``W``) for ``dX = dY W``: column ``k`` of ``W`` holds the entries
  ``t_perm[t_row_ptr[k]:t_row_ptr[k+1]]`` of ``values``, whose rows are ``t_col_idx[...]``
  ascending. ``values[t_perm]`` is the value array of ``W^T`` in CSR order.

:func:`mask_index` caches the index on the mask tensor through ``sparsekern.ops._mask_cache``:
keyed on the mask object (a weak reference: a new tensor at a recycled address never matches)
and its version counter, which every in-place write bumps (``set_mask``'s ``copy_``,
``mask[i] = False``, ``mask &= m``, ``load_state_dict``, Han rounds, RigL updates, gradual
steps), so a changed mask is re-indexed before any use. Writes through ``mask.data`` bypass the
counter; ``sparsekern.check_masks`` finds those (``stale_tags``). The index tensors are never
written after construction; treat them as read-only.

Memory: 4 (col) + 4 (t_col) + 8 (flat) + 8 (t_perm) = 24 bytes per kept weight, plus
``4 (N + K + 2)`` bytes for the row pointers.
"""

from __future__ import annotations

import math

import torch

from sparsekern.ops._mask_cache import cached_on_mask

__all__ = ["MaskIndex", "build_index", "mask_index"]

_INDEX_TAG = "sparse_train.index"


def _fail(what: str, expected: str, got) -> None:
    raise ValueError(f"MaskIndex: {what}: expected {expected}, got {got}")


class MaskIndex:
    """CSR (and transposed CSR) index of a bool mask viewed as ``[N, K]``; see the module doc.

    Attributes: ``shape (N, K)``, ``weight_shape`` (the mask's own shape), ``nnz``, ``density``
    (``nnz / (N*K)``), ``device``, ``row_ptr``, ``col_idx``, ``flat_idx``, ``t_row_ptr``,
    ``t_col_idx``, ``t_perm``.

    The constructor checks every dtype, shape and device (errors name expected vs got) and the
    pointer arrays' ends; :meth:`validate` also checks ordering and bounds (O(nnz)).
    """

    __slots__ = (
        "shape",
        "weight_shape",
        "nnz",
        "device",
        "row_ptr",
        "col_idx",
        "flat_idx",
        "t_row_ptr",
        "t_col_idx",
        "t_perm",
        "_extra",
    )

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        row_ptr: torch.Tensor,
        col_idx: torch.Tensor,
        flat_idx: torch.Tensor,
        t_row_ptr: torch.Tensor,
        t_col_idx: torch.Tensor,
        t_perm: torch.Tensor,
    ) -> None:
        weight_shape = tuple(int(s) for s in weight_shape)
        if len(weight_shape) < 2:
            _fail("weight_shape", "at least 2 dims ([N, K, ...])", list(weight_shape))
        n, k = weight_shape[0], math.prod(weight_shape[1:])
        nnz = int(col_idx.numel())
        device = row_ptr.device
        for label, t, dtype, numel in (
            ("row_ptr", row_ptr, torch.int32, n + 1),
            ("col_idx", col_idx, torch.int32, nnz),
            ("flat_idx", flat_idx, torch.int64, nnz),
            ("t_row_ptr", t_row_ptr, torch.int32, k + 1),
            ("t_col_idx", t_col_idx, torch.int32, nnz),
            ("t_perm", t_perm, torch.int64, nnz),
        ):
            if not isinstance(t, torch.Tensor):
                _fail(label, "a Tensor", type(t).__name__)
            if t.dtype != dtype:
                _fail(f"{label}.dtype", str(dtype), t.dtype)
            if t.dim() != 1 or t.numel() != numel:
                _fail(f"{label}.shape", f"[{numel}]", list(t.shape))
            if t.device != device:
                _fail(f"{label}.device", f"{device} (row_ptr's)", t.device)
            if not t.is_contiguous():
                _fail(label, "a contiguous tensor", "a strided view")
        if n * k >= 2**31:
            # int32 column indices and row pointers address at most 2^31 - 1 entries.
            _fail("size", "N*K < 2^31", n * k)
        for label, ptr in (("row_ptr", row_ptr), ("t_row_ptr", t_row_ptr)):
            ends = (int(ptr[0]), int(ptr[-1]))
            if ends != (0, nnz):
                _fail(f"{label}[0], {label}[-1]", f"(0, {nnz})", ends)
        self.weight_shape = weight_shape
        self.shape = (n, k)
        self.nnz = nnz
        self.device = device
        self.row_ptr, self.col_idx, self.flat_idx = row_ptr, col_idx, flat_idx
        self.t_row_ptr, self.t_col_idx, self.t_perm = t_row_ptr, t_col_idx, t_perm
        self._extra: dict = {}

    @property
    def density(self) -> float:
        n, k = self.shape
        return self.nnz / (n * k) if n * k else 0.0

    def validate(self) -> MaskIndex:
        """Full check (O(nnz)): pointers non-decreasing, indices in range and ascending within
        each row, ``flat_idx`` and ``t_perm`` consistent with them. Returns self."""
        n, k = self.shape
        for label, ptr in (("row_ptr", self.row_ptr), ("t_row_ptr", self.t_row_ptr)):
            if bool((ptr[1:] < ptr[:-1]).any()):
                _fail(label, "non-decreasing values", "a decrease")
        rows = self.rows()
        col = self.col_idx.long()
        if self.nnz and (int(col.min()) < 0 or int(col.max()) >= k):
            _fail("col_idx", f"values in [0, {k})", f"[{int(col.min())}, {int(col.max())}]")
        if not torch.equal(self.flat_idx, rows * k + col):
            _fail("flat_idx", "row * K + col of each entry", "other values")
        if self.nnz > 1 and not bool((self.flat_idx[1:] > self.flat_idx[:-1]).all()):
            _fail("col_idx", "ascending, unique columns within each row", "a repeat or descent")
        t_rows = torch.repeat_interleave(
            torch.arange(k, device=self.device), torch.diff(self.t_row_ptr.long())
        )
        if not torch.equal(col[self.t_perm], t_rows) or not torch.equal(
            rows[self.t_perm], self.t_col_idx.long()
        ):
            _fail("t_perm / t_col_idx", "the transpose of the CSR", "a different matrix")
        return self

    def rows(self) -> torch.Tensor:
        """Row of each kept entry, int64 ``[nnz]`` (CSR order)."""
        return torch.repeat_interleave(
            torch.arange(self.shape[0], device=self.device), torch.diff(self.row_ptr.long())
        )

    def to_mask(self) -> torch.Tensor:
        """The bool mask, in ``weight_shape``."""
        n, k = self.shape
        m = torch.zeros(n * k, dtype=torch.bool, device=self.device)
        m[self.flat_idx] = True
        return m.view(self.weight_shape)

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight.reshape(-1)[flat_idx]``: the kept values ``[nnz]`` (a copy)."""
        self.check_weight(weight)
        return weight.reshape(-1)[self.flat_idx]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """The dense ``weight_shape`` tensor with ``values [nnz]`` at the kept entries, 0
        elsewhere."""
        if values.shape != (self.nnz,):
            _fail("values.shape", f"[{self.nnz}]", list(values.shape))
        out = values.new_zeros(math.prod(self.weight_shape))
        out[self.flat_idx] = values
        return out.view(self.weight_shape)

    def check_weight(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != self.weight_shape:
            _fail("weight.shape", str(list(self.weight_shape)), list(weight.shape))
        if weight.device != self.device:
            _fail("weight.device", str(self.device), weight.device)

    def memo(self, key, compute):
        """A value derived from this index only (e.g. a torch.sparse pattern), kept with it."""
        hit = self._extra.get(key)
        if hit is None:
            hit = self._extra[key] = compute()
        return hit

    def nbytes(self) -> int:
        """Bytes held by the index tensors."""
        return sum(
            t.numel() * t.element_size()
            for t in (
                self.row_ptr,
                self.col_idx,
                self.flat_idx,
                self.t_row_ptr,
                self.t_col_idx,
                self.t_perm,
            )
        )

    def __eq__(self, other) -> bool:
        # Same pattern (what stale_tags compares a recomputation with), not identity.
        return isinstance(other, MaskIndex) and (
            self.weight_shape == other.weight_shape
            and self.nnz == other.nnz
            and all(
                torch.equal(getattr(self, a), getattr(other, a))
                for a in ("row_ptr", "col_idx", "flat_idx", "t_row_ptr", "t_col_idx", "t_perm")
            )
        )

    __hash__ = None

    def __repr__(self) -> str:
        return (
            f"MaskIndex(shape={self.shape}, weight_shape={self.weight_shape}, nnz={self.nnz}, "
            f"density={self.density:.4f}, device={self.device})"
        )


def _check_mask(mask) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.bool Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
    if mask.dim() < 2:
        raise ValueError(f"mask: expected at least 2 dims ([N, K, ...]), got {list(mask.shape)}")


def build_index(mask: torch.Tensor) -> MaskIndex:
    """Build the :class:`MaskIndex` of ``mask`` (bool, ``[N, K, ...]``), uncached."""
    _check_mask(mask)
    n = mask.shape[0]
    k = math.prod(mask.shape[1:])
    m2 = mask.detach().reshape(n, k)
    flat = torch.flatten(m2).nonzero().squeeze(1)  # row-major: rows, then columns, ascending
    col = flat % k if k else flat
    counts = m2.sum(1, dtype=torch.int64)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=mask.device)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    # CSR of W^T: a stable sort by column keeps rows ascending within each column.
    t_perm = torch.sort(col, stable=True).indices if flat.numel() else flat.clone()
    t_counts = torch.bincount(col, minlength=k) if k else col.new_zeros(0)
    t_row_ptr = torch.zeros(k + 1, dtype=torch.int64, device=mask.device)
    torch.cumsum(t_counts, 0, out=t_row_ptr[1:])
    rows = flat // k if k else flat
    return MaskIndex(
        tuple(mask.shape),
        row_ptr.to(torch.int32),
        col.to(torch.int32),
        flat.contiguous(),
        t_row_ptr.to(torch.int32),
        rows[t_perm].to(torch.int32).contiguous(),
        t_perm.contiguous(),
    )


def mask_index(mask: torch.Tensor) -> MaskIndex:
    """The :class:`MaskIndex` of ``mask``, cached on the mask until it changes (object or
    version counter; see the module doc). About a microsecond on a hit."""
    _check_mask(mask)
    return cached_on_mask(mask, _INDEX_TAG, build_index)
