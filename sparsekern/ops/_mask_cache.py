"""Values derived from a mask (tile flags, block layouts, ``where(mask, weight, 0)``), cached on the
mask tensor object.

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

__all__ = ["cached_on_mask", "drop_cache", "masked_copy", "stale_tags"]

# id(mask) -> (weak ref to the mask, {tag: (mask version, compute, value)})
_CACHE: dict[int, tuple[weakref.ref, dict[str, tuple]]] = {}


def _entries(mask: torch.Tensor) -> dict[str, tuple]:
    key = id(mask)
    entry = _CACHE.get(key)
    if entry is None or entry[0]() is not mask:
        entry = (weakref.ref(mask, lambda _r, k=key: _CACHE.pop(k, None)), {})
        _CACHE[key] = entry
    return entry[1]


def cached_on_mask(mask: torch.Tensor, tag: str, compute: Callable[[torch.Tensor], object]):
    """``compute(mask)``, cached per (mask object, tag) until the mask is modified in place."""
    entries = _entries(mask)
    hit = entries.get(tag)
    if hit is not None and hit[0] == mask._version:
        return hit[2]
    value = compute(mask)
    entries[tag] = (mask._version, compute, value)
    return value


def masked_copy(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, weight, 0)`` (no autograd), cached until the weight or the mask changes
    (object, version counter or data pointer). One entry per mask: a weight-sized tensor.

    A fresh tensor is made on every recompute (never updated in place), so a value an autograd
    graph saved stays what it was."""
    entries = _entries(mask)
    hit = entries.get("masked_copy")
    key = (weight._version, weight.data_ptr(), weight.dtype, mask._version)
    if hit is not None and hit[1][0]() is weight and hit[1][1] == key:
        return hit[2]
    with torch.no_grad():
        value = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    entries["masked_copy"] = (mask._version, (weakref.ref(weight), key), value)
    return value


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
    that bypassed the version counter (``mask.data[...] = ...``) left behind. The masked copy of a
    weight is checked by recomputing ``where`` on the weight it remembers."""
    entry = _CACHE.get(id(mask))
    if entry is None or entry[0]() is not mask:
        return []
    stale = []
    for tag, (version, compute, value) in list(entry[1].items()):
        if version != mask._version:
            continue  # already invalid: it will be recomputed before any use
        if tag == "masked_copy":
            weight = compute[0]()
            if weight is None:
                continue
            with torch.no_grad():
                fresh = torch.where(
                    mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)
                )
        else:
            fresh = compute(mask)
        if not _same(fresh, value):
            stale.append(tag)
    return sorted(stale)
