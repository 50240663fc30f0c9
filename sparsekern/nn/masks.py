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

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["apply_masks", "set_mask", "zero_optimizer_state"]


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


@torch.no_grad()
def _apply_checked(
    module: nn.Module, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None
) -> None:
    """set_mask's body, for a ``mask`` already validated against ``module``."""
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
            and device; True keeps a weight.
        optimizer: the optimizer training ``module.weight``, or None. Pass it whenever one exists:
            without it, SGD momentum or Adam moments left at pruned entries move them off zero.

    Raises:
        TypeError: ``module`` is not a sparse module; ``mask`` is not a bool tensor.
        ValueError: ``mask`` has another shape or device than the weight.
    """
    _check_sparse_module(module, "set_mask")
    _check_where(mask, module.weight, "set_mask: mask")
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
