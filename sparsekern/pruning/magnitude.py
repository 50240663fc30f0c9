"""Han et al. 2015's magnitude pruning: per layer, drop every weight whose magnitude is at or below
``quality x std`` of the layer's weights.

The standard deviation is taken over the layer's *surviving* weights (``weight[mask]``), as the
population standard deviation (``correction=0``), computed in float64. Why the survivors: pruned
entries are structural zeros, not weights. Counting them would shrink the threshold as the layer
gets sparser (a layer at 10% density has an all-weights std of about sqrt(0.1) = 0.32 of its
survivors' std), so a second round at the same quality would prune almost nothing; over the
survivors it prunes a further slice each round, which is what iterative pruning (prune -> retrain
-> prune ...) wants. The new mask is ``old_mask & (|w| > threshold)``: a pruned weight never
returns, so the rounds are monotone in sparsity by construction.

How fast a constant quality compounds (no retraining in between, Gaussian weights): q = 1 keeps
32% -> 11% -> 4% of the layer over three rounds; q = 1.5 keeps 13% -> 0.3%; for uniform weights
(a fresh ``nn.Linear``) q = 1.5 keeps 13% and then nothing (the survivors' std is 0.93 of the
range, so 1.5 x std is past every weight). For iterative pruning use a schedule of smaller
qualities, target densities (``HanPruner.prune(density=...)``, :func:`quality_for_density`), or
``HanPruner(min_density=...)`` as a floor.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsekern.nn.masks import set_mask
from sparsekern.pruning._layers import require_sparse_layers, resolve_per_layer

__all__ = [
    "han_threshold",
    "keep_at_least",
    "magnitude_mask",
    "magnitude_prune_",
    "prune_model_",
    "quality_for_density",
]


def _check(weight: torch.Tensor, mask: torch.Tensor, who: str, name: str | None = None) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{who}: expected a torch.bool mask, got {got}")
    if mask.shape != weight.shape:
        raise ValueError(
            f"{who}: expected a mask of the weight's shape {list(weight.shape)}, "
            f"got {list(mask.shape)}"
        )
    # a NaN compares False with every threshold and makes std NaN: the whole layer would be pruned
    bad = ~torch.isfinite(weight.detach())
    if bool(bad.any()):
        where = f"layer {name!r}" if name is not None else "the weight"
        raise ValueError(
            f"{who}: expected finite weights, got {int(bad.count_nonzero())} NaN/inf of "
            f"{weight.numel()} in {where}; fix the training or the checkpoint before pruning"
        )


def han_threshold(
    weight: torch.Tensor, mask: torch.Tensor, quality: float, *, name: str | None = None
) -> float:
    """Han's pruning threshold ``quality * std(weight[mask])``.

    Args:
        weight: the layer's weight, ``[out, in]`` or ``[out, in/groups, kh, kw]``, any float dtype.
        mask: bool, the weight's shape; True marks the surviving weights.
        quality: the quality parameter, >= 0.
        name: the layer's name, for the error a non-finite weight raises.

    Returns:
        The threshold as a Python float: ``quality`` times the population standard deviation
        (``correction=0``) of the surviving weights, computed in float64. 0.0 when no weight
        survives (there is nothing left to prune).
    """
    _check(weight, mask, "han_threshold", name)
    if not (quality >= 0 and math.isfinite(quality)):
        raise ValueError(f"han_threshold: expected a finite quality >= 0, got {quality}")
    kept = weight.detach()[mask].double()
    if kept.numel() == 0:
        return 0.0
    return float(quality * kept.std(correction=0))


def _above(abs_w: torch.Tensor, threshold: float) -> torch.Tensor:
    """``abs_w > threshold`` exactly as if compared in float64, without a float64 copy of
    ``abs_w``: round the threshold *down* to ``abs_w``'s dtype; then for any representable x,
    x > t_down  <=>  x > t (no representable value lies in (t_down, t])."""
    if abs_w.dtype == torch.float64:
        return abs_w > threshold
    if abs_w.dtype in (torch.float16, torch.bfloat16):
        abs_w = abs_w.float()  # exact upcast; nextafter below wants float32
    t = torch.tensor(threshold, dtype=torch.float64)
    t_down = t.to(abs_w.dtype)
    if t_down.double() > t:
        t_down = torch.nextafter(t_down, torch.tensor(-math.inf, dtype=abs_w.dtype))
    return abs_w > t_down.to(abs_w.device)


@torch.no_grad()
def magnitude_mask(
    weight: torch.Tensor, mask: torch.Tensor, quality: float, *, name: str | None = None
) -> torch.Tensor:
    """The mask after one round of Han pruning: ``mask & (|weight| > han_threshold(...))``.

    Args:
        weight: ``[out, in]`` or ``[out, in/groups, kh, kw]``.
        mask: bool, the weight's shape.
        quality: >= 0.
        name: the layer's name, for the error a non-finite weight raises.

    Returns:
        A new bool tensor of the weight's shape; never True where ``mask`` is False.

    Raises:
        ValueError: a NaN or inf weight (naming the layer).
    """
    threshold = han_threshold(weight, mask, quality, name=name)
    return mask & _above(weight.detach().abs(), threshold)


@torch.no_grad()
def keep_at_least(
    weight: torch.Tensor, old_mask: torch.Tensor, new_mask: torch.Tensor, count: int
) -> torch.Tensor:
    """``new_mask``, or, if it keeps fewer than ``count`` weights, the ``count`` largest-magnitude
    weights of ``old_mask`` (all of ``old_mask`` if it has no more). Never regrows a weight.

    Args:
        weight: ``[out, in]`` or ``[out, in/groups, kh, kw]``.
        old_mask, new_mask: bool, the weight's shape; ``new_mask`` within ``old_mask``.
        count: the floor, >= 0.
    """
    if int(new_mask.count_nonzero()) >= count:
        return new_mask
    if int(old_mask.count_nonzero()) <= count:
        return old_mask.clone()
    score = weight.detach().abs().double().masked_fill(~old_mask, -1.0).flatten()
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep[torch.topk(score, count).indices] = True
    return keep.view_as(old_mask)


def magnitude_prune_(
    module: nn.Module, quality: float, optimizer: torch.optim.Optimizer | None = None
) -> torch.Tensor:
    """Prune one sparse layer in place by Han's rule and return its new mask.

    The new mask is installed with :func:`sparsekern.nn.set_mask`, which zeroes the pruned weights
    and, when ``optimizer`` is given, their optimizer state (momentum, Adam moments). Surviving
    weights are left exactly as they were (Han: retrain from the survivors, never re-initialise).

    Args:
        module: a ``SparseLinear`` / ``SparseConv2d`` (``weight`` plus a bool ``mask`` buffer).
        quality: the quality parameter, >= 0.
        optimizer: the optimizer training ``module.weight``, if any.

    Returns:
        ``module.mask``, bool, the weight's shape.
    """
    new = magnitude_mask(module.weight, module.mask, quality, name=type(module).__name__)
    set_mask(module, new, optimizer)
    return module.mask


@torch.no_grad()
def quality_for_density(
    weight: torch.Tensor, mask: torch.Tensor, density: float, *, name: str | None = None
) -> float:
    """The quality parameter that makes Han's rule keep about ``density`` of the layer's weights.

    Han's Table 2 lists the kept fraction per layer (LeNet-300-100: 8%, 9%, 26%); this inverts the
    rule so a target density can be hit: sort the survivors' magnitudes, take the magnitude
    ``t`` that leaves ``round(density * numel)`` of them above it, return ``t / std``. Ties at
    ``t`` and rounding of ``t / std * std`` can move the result by a weight or two.

    Args:
        weight: ``[out, in]`` or ``[out, in/groups, kh, kw]``.
        mask: bool, the weight's shape.
        density: target kept fraction of *all* the layer's weights, in [0, 1].

    Returns:
        A quality >= 0 (0.0 when the layer already keeps no more than ``density``).
    """
    _check(weight, mask, "quality_for_density", name)
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"quality_for_density: expected a density in [0, 1], got {density}")
    kept = weight.detach()[mask].double()
    target = round(density * weight.numel())
    if target >= kept.numel() or kept.numel() == 0:
        return 0.0
    std = float(kept.std(correction=0))  # of the signed weights, as han_threshold takes it
    kept = kept.abs()
    if std == 0.0:
        return 0.0
    # keep the `target` largest: the threshold is the (n - target)-th smallest magnitude
    t = float(torch.kthvalue(kept, kept.numel() - target).values)
    return t / std


def prune_model_(
    model: nn.Module,
    quality: float | dict[str, float],
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """One round of Han pruning over every sparse layer of ``model``, each by its own quality.

    Args:
        model: a model with sparse layers (see ``sparsekern.sparsify``).
        quality: one quality for every layer, or a dict looked up by layer name, then by kind
            (``"conv"`` / ``"fc"``), then ``"*"``; layers it does not cover are not pruned.
        optimizer: the optimizer training the model, if any (its state is zeroed at pruned
            entries).

    Returns:
        ``{layer name: kept fraction of the layer's weights}`` after pruning, for every sparse
        layer.
    """
    layers = require_sparse_layers(model, "prune_model_")
    qualities = resolve_per_layer(layers, quality, "prune_model_: quality")
    # Compute every mask before installing any, so a failure leaves the model untouched.
    masks = {
        n: magnitude_mask(m.weight, m.mask, qualities[n], name=n)
        for n, m in layers.items()
        if qualities[n] is not None
    }
    for n, mask in masks.items():
        set_mask(layers[n], mask, optimizer)
    return {n: int(m.mask.count_nonzero()) / m.mask.numel() for n, m in layers.items()}
