"""Values derived from a mask (tile flags, block layouts, ``where(mask, weight, 0)``), cached on the
mask tensor object: the package's one version-keyed cache. Values derived from other tensors
(torch's CSR/BSR tensor of a layer's values, a sparse layer's dense weight) are cached on those
tensors the same way.

A derived value is recomputed only when what it was computed from changes:

* mask-derived entries remember the mask's version counter, which every in-place write bumps
  (``set_mask``'s ``copy_``, ``mask[i] = False``, ``mask &= other``, ``load_state_dict``);
* the masked copy of a weight also remembers the weight (a weak reference, so a new tensor at a
  recycled address never matches), its version counter and its data pointer.

Writes through ``mask.data`` / ``mask.numpy()`` bypass the version counter and cannot be seen;
:func:`stale_tags` recomputes every entry of a mask and names the ones that no longer match
(``sparsekern.check_masks`` reports them and drops them). Change masks with
``sparsekern.nn.set_mask`` or in-place ops on the buffer itself. Entries die with their mask
(a weak reference), so nothing is kept alive for a mask that is gone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

__all__ = [
    "TensorRef",
    "cached_bytes",
    "cached_on_mask",
    "drop_cache",
    "masked_copy",
    "stale_tags",
    "tensor_key",
]

# id(tensor) -> (weak ref to the tensor, {tag: (version, key, compute, value)})
_CACHE: dict[int, tuple[weakref.ref, dict[str, tuple]]] = {}


def _entries(t: torch.Tensor) -> dict[str, tuple]:
    ident = id(t)
    entry = _CACHE.get(ident)
    if entry is None or entry[0]() is not t:
        entry = (weakref.ref(t, lambda _r, k=ident: _CACHE.pop(k, None)), {})
        _CACHE[ident] = entry
    return entry[1]


def cached_on_mask(
    mask: torch.Tensor, tag: str, compute: Callable[[torch.Tensor], object], key=None
):
    """``compute(mask)``, cached per (tensor, tag) until the tensor is modified in place or
    ``key`` (anything comparable: what else the value was computed from) changes. One entry per
    tag: a new key replaces the old value."""
    entries = _entries(mask)
    hit = entries.get(tag)
    if hit is not None and hit[0] == mask._version and hit[1] == key:
        return hit[3]
    value = compute(mask)
    entries[tag] = (mask._version, key, compute, value)
    return value


class TensorRef:
    """A weak reference to a tensor that compares equal to another only while both point to the
    same live tensor (a weakref's own ``==`` would compare the tensors elementwise)."""

    __slots__ = ("ref",)

    def __init__(self, t: torch.Tensor):
        self.ref = weakref.ref(t)

    def __call__(self) -> torch.Tensor | None:
        return self.ref()

    def __eq__(self, other) -> bool:
        return isinstance(other, TensorRef) and self.ref() is not None and self.ref() is other.ref()

    __hash__ = None


def tensor_key(*tensors: torch.Tensor) -> tuple:
    """A ``key`` for :func:`cached_on_mask` naming tensors besides the one the value is cached on
    (index buffers, say): per tensor its ``id``, version counter and data pointer, plain ints
    compared at C speed (a :class:`TensorRef` per tensor costs a Python ``__eq__`` per lookup).
    An ``id`` names one tensor only while it lives, so the entry must keep these tensors alive:
    the ``compute`` passed with this key refers to them."""
    key = []
    for t in tensors:
        key += (id(t), t._version, t.data_ptr())
    return tuple(key)


def masked_copy(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, weight, 0)`` (no autograd), cached until the weight or the mask changes
    (object, version counter or data pointer). One entry per mask: a weight-sized tensor.

    A fresh tensor is made on every recompute (never updated in place), so a value an autograd
    graph saved stays what it was."""
    ref = TensorRef(weight)

    def compute(m):
        w = ref()
        with torch.no_grad():
            return torch.where(m, w, torch.zeros((), dtype=w.dtype, device=w.device))

    key = (ref, weight._version, weight.data_ptr(), weight.dtype)
    return cached_on_mask(mask, "masked_copy", compute, key)


def cached_bytes(mask: torch.Tensor) -> int:
    """Bytes held by the tensors cached on ``mask`` (what a sparse layer keeps beyond its
    weight and mask)."""
    entry = _CACHE.get(id(mask))
    if entry is None or entry[0]() is not mask:
        return 0
    total = 0
    for *_, value in entry[1].values():
        if hasattr(value, "nbytes") and callable(value.nbytes):  # e.g. a sparse_train MaskIndex
            total += value.nbytes()
            continue
        parts = value if isinstance(value, tuple) else (value,)
        total += sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
    return total


def drop_cache(mask: torch.Tensor) -> None:
    """Forget everything derived from ``mask``."""
    _CACHE.pop(id(mask), None)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):  # NamedTuple layouts
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def stale_tags(mask: torch.Tensor) -> list[str]:
    """Tags of the cached entries of ``mask`` that differ from a recomputation now: what a write
    that bypassed a version counter (``mask.data[...] = ...``, ``weight.data``) left behind."""
    entry = _CACHE.get(id(mask))
    if entry is None or entry[0]() is not mask:
        return []
    stale = []
    for tag, (version, key, compute, value) in list(entry[1].items()):
        if version != mask._version:
            continue  # already invalid: it will be recomputed before any use
        if isinstance(key, tuple) and key and isinstance(key[0], TensorRef) and key[0]() is None:
            continue  # computed from a tensor that is gone: never served again
        if not _same(compute(mask), value):
            stale.append(tag)
    return sorted(stale)
