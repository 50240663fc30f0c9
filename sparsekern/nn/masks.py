"""The mask invariant, in one call.

Invariant kept by :func:`set_mask` for a sparse module (``SparseLinear``, ``SparseConv2d``):

* ``module.mask`` (bool, the weight's shape) says which weights exist;
* ``module.weight`` is exactly zero wherever the mask is False (and so is ``weight.grad``);
* the optimizer's per-parameter state for the weight (momentum, Adam moments, ...) is exactly zero
  wherever the mask is False, and also wherever the mask just changed: a regrown weight starts at
  zero with zero state, as RigL requires.

With that state zero and the masked ops giving exactly-zero weight gradients at pruned entries, any
of the usual optimizers (SGD with momentum and weight decay, Adam, AdamW) leaves pruned weights at
exactly 0 on every step, without re-applying the mask.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn

from sparsekern.ops._mask_cache import drop_cache, stale_tags

__all__ = [
    "apply_masks",
    "check_masks",
    "mask_every_gradient",
    "mask_problems",
    "note_mask_synced",
    "register_weight_user",
    "set_mask",
    "sync_optimizer",
    "zero_optimizer_state",
]


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _check_where(where, param: torch.Tensor, what: str) -> None:
    """Raise unless ``where`` is a bool tensor of ``param``'s shape on ``param``'s device."""
    if not isinstance(where, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.bool Tensor, got {type(where).__name__}")
    if where.dtype != torch.bool:
        raise TypeError(f"{what}: expected dtype torch.bool, got {where.dtype}")
    if where.shape != param.shape:
        raise ValueError(
            f"{what}: expected the weight's shape {_shape(param)}, got {_shape(where)}"
        )
    if where.device != param.device:
        raise ValueError(f"{what}: expected the weight's device {param.device}, got {where.device}")


def _check_optimizer(optimizer, what: str) -> None:
    """Raise unless ``optimizer`` is None or a ``torch.optim.Optimizer`` (anything with a
    ``state`` mapping, as ZeroRedundancyOptimizer): checked before a mask is installed."""
    if optimizer is not None and not isinstance(getattr(optimizer, "state", None), Mapping):
        raise TypeError(
            f"{what}: expected optimizer as None or a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}"
        )


def _check_sparse_module(module, what: str) -> None:
    """Raise unless ``module`` carries a ``weight`` and a ``mask`` buffer (duck-typed, so any module
    built on the sparse-module mixin qualifies)."""
    if not (
        isinstance(module, nn.Module)
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(module._buffers.get("mask"), torch.Tensor)
    ):
        raise TypeError(
            f"{what}: expected a sparse module with a `mask` buffer (SparseLinear, SparseConv2d; "
            f"see sparsekern.sparsify), got {type(module).__name__}"
        )


def note_mask_synced(module: nn.Module) -> None:
    """Record that ``module``'s weight is zero where its mask buffer is False now (after
    ``set_mask``, a load or a resync), so the next forward does not zero it again."""
    mask = module._buffers.get("mask")
    if isinstance(mask, torch.Tensor):
        module.__dict__["_mask_synced"] = (mask, mask._version)


def zero_optimizer_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor
) -> list[str]:
    """Zero, in place, every per-parameter state tensor of ``param`` where ``where`` is True.

    Works for any optimizer: every tensor in ``optimizer.state[param]`` with ``param``'s shape (SGD
    ``momentum_buffer``; Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; ...) is
    zeroed; other entries (``step`` and other scalars) are left alone. A parameter the optimizer has
    no state for yet (not stepped, or not one of its parameters) is a no-op.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        param: the parameter, e.g. ``module.weight`` ``[out, in]`` or ``[out, in/g, kh, kw]``.
        where: ``torch.bool``, ``param``'s shape and device; True marks entries to zero.

    Returns:
        The names of the state entries that were zeroed (sorted).
    """
    _check_where(where, param, "zero_optimizer_state: where")
    _check_optimizer(optimizer, "zero_optimizer_state")
    state = optimizer.state.get(param)  # .get: don't let the defaultdict create an entry
    if not state:
        return []
    zeroed = []
    for key, value in state.items():
        # dim() > 0 keeps `step` (a 0-d tensor) out even for a hypothetical 0-d parameter.
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param.shape:
            # State may live elsewhere than the parameter (e.g. offloaded): follow it.
            value.masked_fill_(where.to(value.device), 0)
            zeroed.append(key)
    return sorted(zeroed)


# id(weight Parameter) -> (weak ref to the weight, weak set of the sparse modules holding it): who
# else a set_mask would change weights for.
_WEIGHT_USERS: dict[int, tuple[weakref.ref, weakref.WeakSet]] = {}


def register_weight_user(module: nn.Module) -> None:
    """Record that sparse ``module`` holds its weight Parameter (``from_dense`` calls this), so
    that ``set_mask`` can see another sparse module holding the same one."""
    w = module.weight
    key = id(w)
    entry = _WEIGHT_USERS.get(key)
    if entry is None or entry[0]() is not w:
        entry = (weakref.ref(w, lambda _r, k=key: _WEIGHT_USERS.pop(k, None)), weakref.WeakSet())
        _WEIGHT_USERS[key] = entry
    entry[1].add(module)


def _other_users(module: nn.Module) -> list[nn.Module]:
    entry = _WEIGHT_USERS.get(id(module.weight))
    if entry is None or entry[0]() is not module.weight:
        return []
    return [
        m
        for m in entry[1]
        if m is not module
        and getattr(m, "weight", None) is module.weight
        and m._buffers.get("mask") is not module._buffers.get("mask")
    ]


@torch.no_grad()
def _apply_checked(
    module: nn.Module, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None
) -> None:
    """set_mask's body, for a ``mask`` already validated against ``module``."""
    others = _other_users(module)
    if others:
        # Two masks over one weight: zeroing this one's pruned entries would silently change the
        # other layer's weights. One mask per Parameter (sparsify shares the buffer).
        raise ValueError(
            f"set_mask: expected a weight with one mask, got a weight also held by "
            f"{len(others)} other sparse module(s) with a mask of their own "
            f"({[type(m).__name__ for m in others]}); give them the same mask tensor "
            "(other.mask = module.mask, as sparsify does for shared weights)"
        )
    weight = module.weight
    new = mask.clone()  # independent of the caller's tensor (which may even alias module.mask)
    pruned = ~new
    reset = pruned | (new != module.mask)  # pruned, or regrown / newly pruned: start from zero
    module.mask.copy_(new)  # in place: the buffer object (and anything holding it) stays the same
    weight.masked_fill_(reset, 0)
    if weight.grad is not None:
        weight.grad.masked_fill_(reset, 0)
    if optimizer is not None:
        zero_optimizer_state(optimizer, weight, reset)
    note_mask_synced(module)


def set_mask(
    module: nn.Module, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Install ``mask`` on a sparse module and restore the mask invariant (module docstring).

    In order: validate (nothing is modified when it fails); copy ``mask`` into ``module.mask`` in
    place (same buffer object); zero ``weight`` and ``weight.grad`` where the new mask is False or
    where the mask changed; if ``optimizer`` is given, zero the weight's optimizer state at those
    same entries (:func:`zero_optimizer_state`).

    Args:
        module: a ``SparseLinear`` / ``SparseConv2d`` (anything with ``weight`` and a ``mask``
            buffer).
        mask: ``torch.bool``, the weight's shape (``[out, in]`` or ``[out, in/groups, kh, kw]``)
            and device; True keeps a weight. For a weight FSDP2 shards (a DTensor): the full
            mask, the same on every rank (each keeps its own rows), or a DTensor like the weight.
        optimizer: the optimizer training ``module.weight``, or None. Pass it whenever one exists:
            without it, SGD momentum or Adam moments left at pruned entries move them off zero.

    Raises:
        TypeError: ``module`` is not a sparse module; ``mask`` is not a bool tensor.
        ValueError: ``mask`` has another shape or device than the weight.
    """
    _check_sparse_module(module, "set_mask")
    _check_where(mask, module.weight, "set_mask: mask")
    _check_optimizer(optimizer, "set_mask")
    if hasattr(module, "repack_mask"):  # compact storage: values and optimizer state re-packed
        module.repack_mask(mask, optimizer)
        return
    if type(module.weight).__name__ == "DTensor":  # FSDP2: this rank's rows of the full mask
        from sparsekern.nn._dtensor import local_like, shard_mask

        shard_mask(module)
        if type(mask).__name__ != "DTensor":
            mask = local_like(mask, module.weight)
    _apply_checked(module, mask, optimizer)


def apply_masks(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """:func:`set_mask` for many modules of ``model``, all or nothing.

    Every name and mask is validated before any is applied, so a bad entry leaves the whole model
    untouched.

    Args:
        model: a model holding sparse modules (see ``sparsekern.sparsify``).
        masks: module name (as in ``model.named_modules()`` / ``sparse_modules(model)``, e.g.
            ``"features.0"``) -> bool mask of that module's weight shape and device.
        optimizer: as in :func:`set_mask`.

    Raises:
        KeyError: a name is not a submodule of ``model``.
        TypeError / ValueError: as in :func:`set_mask`, with the module's name.
    """
    _check_optimizer(optimizer, "apply_masks")
    checked = []
    for name, mask in masks.items():
        try:
            # get_submodule rather than named_modules(): it also resolves the second path of a
            # module registered at two places.
            module = model.get_submodule(name)
        except AttributeError:
            sparse = [
                n
                for n, m in model.named_modules()
                if isinstance(m._buffers.get("mask"), torch.Tensor)
            ]
            raise KeyError(
                f"apply_masks: expected a module name of the model, got {name!r} "
                f"(sparse modules: {sparse})"
            ) from None
        _check_sparse_module(module, f"apply_masks[{name!r}]")
        _check_where(mask, module.weight, f"apply_masks[{name!r}]: mask")
        checked.append((module, mask))
    for module, mask in checked:
        _apply_checked(module, mask, optimizer)


def _masked_modules(model: nn.Module, any_shape: bool = False):
    seen = set()
    for name, module in model.named_modules():
        mask = module._buffers.get("mask")
        weight = getattr(module, "weight", None)
        sparse = isinstance(mask, torch.Tensor) and isinstance(weight, torch.Tensor)
        if sparse and id(module) not in seen and (any_shape or mask.shape == weight.shape):
            seen.add(id(module))
            yield name, module


@torch.no_grad()
def mask_problems(model: nn.Module, fix: bool = False) -> dict[str, list[str]]:
    """What breaks the mask invariant in ``model``, per sparse module: ``{name: [problem, ...]}``
    (empty when it holds; names as in ``model.named_modules()``, ``""`` for ``model`` itself).
    Checked: pruned weights that are not exactly zero, pruned entries of ``weight.grad`` that are
    not zero, and cached values derived from the mask (tile flags, block
    layouts, masked copies) that a recomputation no longer reproduces: what writes that bypass
    version counters (``.data``, ``.numpy()``, ``nn.init``, tied weights) leave behind.

    Args:
        model: any module (sparse modules are found by their ``weight`` and ``mask`` buffer).
        fix: also repair what is found: zero the pruned weights and grads, drop the stale caches.
            Optimizer state is not reachable from here: after a fix, call ``set_mask`` with the
            optimizer (or ``zero_optimizer_state``) for momentum and Adam moments.
    """
    found: dict[str, list[str]] = {}
    for name, module in _masked_modules(model, any_shape=True):
        mask, weight = module._buffers["mask"], module.weight
        if mask.shape != weight.shape:  # the weight was replaced (a resized embedding, tied)
            found[name] = [
                f"mask shape: expected the weight's {_shape(weight)}, got {_shape(mask)}"
            ]
            continue
        if mask.dtype != torch.bool:
            found[name] = [f"mask dtype: expected torch.bool, got {mask.dtype}"]
            continue
        problems = []
        bad = int(torch.count_nonzero(torch.where(mask, 0, weight.detach())))
        if bad:
            problems.append(f"{bad} pruned weights are not zero")
        if weight.grad is not None:
            bad_g = int(torch.count_nonzero(torch.where(mask, 0, weight.grad)))
            if bad_g:
                problems.append(f"{bad_g} pruned entries of weight.grad are not zero")
        stale = stale_tags(mask) + stale_tags(weight)
        if stale:
            problems.append(f"stale cached values derived from the mask: {stale}")
        if problems:
            found[name] = problems
            if fix:
                weight.masked_fill_(~mask, 0)
                if weight.grad is not None:
                    weight.grad.masked_fill_(~mask, 0)
                drop_cache(mask)
                drop_cache(weight)
                note_mask_synced(module)
    return found


def check_masks(model: nn.Module) -> list[str]:
    """Names of the sparse modules of ``model`` whose mask invariant is broken (pruned weights or
    grads not exactly zero, stale mask caches); empty when it holds. See :func:`mask_problems`
    for the details and a repair."""
    return list(mask_problems(model))


class _MaskEveryGradient:
    """A leaf-tensor hook: the weight's whole gradient (every path summed, before it is
    accumulated) zeroed where its sparse module's mask is False."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        mask = self.module._buffers["mask"]
        return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def _has_hook(module: nn.Module) -> bool:
    hooks = getattr(module.weight, "_backward_hooks", None) or {}
    return any(isinstance(h, _MaskEveryGradient) and h.module is module for h in hooks.values())


def mask_every_gradient(module: nn.Module) -> None:
    """Mask the gradient of ``module``'s weight on every path, not only through ``module``'s own
    forward: for a weight that other modules also read (tied embedding and LM head). A hook on
    the weight Parameter zeroes its summed gradient where the mask is False, before it reaches
    ``.grad`` (and what DDP all-reduces). The module remembers it: after ``deepcopy`` or pickling
    (which drop tensor hooks) the next forward registers it again."""
    _check_sparse_module(module, "mask_every_gradient")
    module.__dict__["_mask_every_gradient"] = True
    if not _has_hook(module):
        module.weight.register_hook(_MaskEveryGradient(module))


def ensure_every_gradient_hook(module: nn.Module) -> None:
    """Re-register :func:`mask_every_gradient`'s hook if the module asked for it and its weight
    lost it (a copy, an unpickled module, a new Parameter)."""
    wanted = module.__dict__.get("_mask_every_gradient") and module.weight.requires_grad
    if wanted and not _has_hook(module):
        module.weight.register_hook(_MaskEveryGradient(module))


@torch.no_grad()
def sync_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Zero the optimizer state (momentum, Adam moments, ...) and the ``.grad`` of every sparse
    module's weight where its mask is False: the one call after loading a checkpoint into a live
    model and optimizer (``load_state_dict`` zeroes the pruned weights, but optimizer state is
    not reachable from a module, and stale momentum would move pruned weights off zero at the
    next ``step``). Returns the names of the sparse modules it touched."""
    done = []
    for name, module in _masked_modules(model):
        pruned = ~module._buffers["mask"]
        if module.weight.grad is not None:
            module.weight.grad.masked_fill_(pruned, 0)
        zero_optimizer_state(optimizer, module.weight, pruned)
        done.append(name)
    return done
