"""L1 / L2 penalties over the sparse layers' weights, to add to the training loss.

Han et al.: L1 leaves more weights near zero, so accuracy right after pruning is better, but after
retraining L2 wins (and L1-then-L2 is no better than L2 throughout). The scaling follows Caffe's
weight decay, so ``strength`` means the same as an optimizer's ``weight_decay``:

* ``"l2"``: ``strength / 2 * sum(w^2)``, gradient ``strength * w``;
* ``"l1"``: ``strength * sum(|w|)``, gradient ``strength * sign(w)``.

Use either this or the optimizer's ``weight_decay``, not both, or the decay is applied twice.
Only weights are penalised (biases and other parameters are not). Pruned weights are exactly zero
(``set_mask``), so the penalty's gradient there is exactly zero as well (``2 * 0`` for L2, and
PyTorch's ``sign(0) = 0`` for L1): no weight-sized ``weight * mask`` temporary is needed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sparsekern.pruning._layers import sparse_layers

__all__ = ["regularization_loss", "REGULARIZATIONS"]

REGULARIZATIONS = ("l1", "l2", "none")


def regularization_loss(
    layers: nn.Module | Iterable[nn.Module], kind: str = "l2", strength: float = 5e-4
) -> torch.Tensor:
    """The penalty over the weights of ``layers``.

    Args:
        layers: a model (its sparse layers are used) or an iterable of sparse modules.
        kind: ``"l2"``, ``"l1"`` or ``"none"``.
        strength: the coefficient (Caffe's ``weight_decay``), >= 0.

    Returns:
        A 0-d tensor on the weights' device and dtype, differentiable w.r.t. the weights (0 when
        there are no layers or ``kind == "none"``).
    """
    if kind not in REGULARIZATIONS:
        raise ValueError(f"regularization_loss: expected kind in {REGULARIZATIONS}, got {kind!r}")
    if strength < 0:
        raise ValueError(f"regularization_loss: expected strength >= 0, got {strength}")
    mods = list(sparse_layers(layers).values()) if isinstance(layers, nn.Module) else list(layers)
    if not mods or kind == "none" or strength == 0:
        ref = mods[0].weight if mods else torch.zeros(())
        return ref.new_zeros(())
    total = None
    for m in mods:
        w = m.weight
        term = w.abs().sum() if kind == "l1" else w.pow(2).sum()
        total = term if total is None else total + term.to(total.device)
    return total * (strength if kind == "l1" else strength / 2)
