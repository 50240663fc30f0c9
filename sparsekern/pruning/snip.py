"""SNIP (Lee et al. 2019, "Single-shot Network Pruning based on Connection Sensitivity"): prune
once, at initialisation, by connection sensitivity ``|dL/dc| = |g * w|`` (``g`` the gradient of
the loss w.r.t. the weight, on one or a few batches, of the *dense* net), keeping the largest
scores over all layers together; then train the sparse net normally."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from sparsekern.pruning._common import (
    check_fraction,
    dense_weight_grads,
    topk_mask,
    warn_collapsed,
)
from sparsekern.pruning.base import Closure
from sparsekern.pruning.importance import ImportancePruner, TaylorImportance

__all__ = ["SNIPPruner", "snip_masks", "snip_scores"]


def snip_scores(
    layers: dict[str, nn.Module], loss_fn: Callable[[object], torch.Tensor], batches: Iterable
) -> dict[str, torch.Tensor]:
    """Connection sensitivity ``|g * w|`` per weight, ``g`` the dense gradient of the loss
    averaged over ``batches``.

    The gradient is the dense one even if some masks are not all True (they are swapped for
    all-True masks while it is computed, see :func:`sparsekern.pruning._common.dense_weight_grads`);
    at initialisation (SNIP's setting) the masks are all True anyway.

    Args:
        layers: ``{name: sparse module}``.
        loss_fn: ``batch -> 0-d loss`` (runs the model on the batch).
        batches: one or a few batches (anything ``loss_fn`` takes).

    Returns:
        ``{name: score}``, float32 of each weight's shape, >= 0.
    """
    total: dict[str, torch.Tensor] | None = None
    count = 0
    for batch in batches:
        g = dense_weight_grads(layers, lambda b=batch: loss_fn(b))
        total = g if total is None else {n: total[n] + g[n] for n in total}
        count += 1
    if count == 0:
        raise ValueError("snip_scores: expected at least one batch, got none")
    return {n: (total[n] / count * layers[n].weight.detach()).abs().float() for n in total}


@torch.no_grad()
def snip_masks(scores: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Keep exactly ``round(density * N)`` of the ``N`` weights: the largest scores over all
    layers together (SNIP's global top-kappa).

    Args:
        scores: ``{name: score}`` (from :func:`snip_scores`).
        density: kept fraction in [0, 1].
    """
    check_fraction(density, "snip_masks", "density")
    names = list(scores)
    flat = torch.cat([scores[n].flatten().double().cpu() for n in names])
    keep = topk_mask(flat, round(density * flat.numel()))
    out, i = {}, 0
    for n in names:
        k = scores[n].numel()
        out[n] = keep[i : i + k].view(scores[n].shape).to(scores[n].device)
        i += k
    warn_collapsed(out, "snip_masks")
    return out


class SNIPPruner(ImportancePruner):
    """SNIP: one-shot masks at initialisation from the connection sensitivity ``|g * w|``
    (:class:`ImportancePruner` with ``TaylorImportance()`` and ``scope="global"``).

    Lifecycle::

        model = sparsify(MyNet())                           # dense: masks all True
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        pruner = SNIPPruner(model, opt, sparsity=0.98)
        x, y = next(iter(loader))                           # one batch (SNIP) or a few
        kept = pruner.prune(closure=lambda: F.cross_entropy(model(x), y))
        ... train the sparse net normally: opt.step(); pruner.step()

    For several batches, let the closure average their losses (the gradient of the mean loss is
    the mean of the gradients).

    Deviation from the paper: the per-layer floor ``min_density`` (default None: ``min(1%,
    (1 - s) / 2)`` and at least one weight per layer) that every pruner has; SNIP's plain global
    top-kappa, which can empty a layer at high sparsity, is ``min_density=0``.

    Args:
        model, optimizer, sparsity, layers, regularization, reg_strength: see
            :class:`BasePruner` (one sparsity for all layers together).
        min_density: the floor (see above).

    Attributes:
        scores: ``{layer: |g * w|}`` of the last :meth:`prune`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        min_density: float | None = None,
        **base,
    ) -> None:
        super().__init__(
            model,
            optimizer,
            importance=TaylorImportance(),
            scope="global",
            min_density=min_density,
            **base,
        )
        self.scores: dict[str, torch.Tensor] | None = None

    def compute_masks(self, sparsity: float, closure: Closure | None = None) -> dict:
        """Score with the dense gradient of ``closure()`` (train mode), keep the global top
        ``1 - sparsity``."""
        if closure is None:
            raise ValueError(
                "SNIPPruner.prune: expected a closure returning the loss on a batch (SNIP scores "
                "|g * w| with its gradient), got None"
            )
        was = self.model.training
        self.model.train()
        try:
            masks = super().compute_masks(sparsity, closure)
        finally:
            self.model.train(was)
        self.scores = self.importance.last
        return masks

    def _config(self) -> dict:
        return {} if self.min_density is None else {"min_density": self.min_density}
