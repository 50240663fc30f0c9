"""Global magnitude pruning (Gupta et al. 2022): rank the weights of all layers together by |w| and
keep the largest, with a minimum kept fraction per layer so that no layer collapses at high
sparsity. The selection is :func:`~sparsekern.pruning.importance.score_masks` with
:class:`~sparsekern.pruning.importance.MagnitudeImportance`, as for every scored pruner."""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.pruning._common import AUTO_MIN_DENSITY
from sparsekern.pruning._vocab import renamed_keywords
from sparsekern.pruning.importance import ImportancePruner, MagnitudeImportance, score_masks

__all__ = ["AUTO_MIN_DENSITY", "GlobalMagnitudePruner", "global_magnitude_masks"]


@renamed_keywords
@torch.no_grad()
def global_magnitude_masks(
    layers: dict[str, nn.Module], sparsity: float, min_density: float | None = None
) -> dict[str, torch.Tensor]:
    """New masks keeping exactly ``round((1 - sparsity) * N)`` weights of the ``N`` weights of
    ``layers``: the largest ``|w|`` over all layers together, among the weights each mask still
    keeps (a pruned weight never returns).

    Every layer first keeps its :func:`~sparsekern.pruning.importance.floor_count` largest
    surviving weights (``max(1, ceil(min_density * numel))``); the rest of the budget goes to the
    largest remaining ``|w|`` globally. ``min_density=None`` (default) is the floor of every
    pruner, ``min(AUTO_MIN_DENSITY, (1 - sparsity) / 2)`` (reduced, with a warning, if the floors
    alone would not fit); ``0``: no floor, a layer left with no weight is warned about
    (RuntimeWarning: layer collapse).

    Args:
        layers: ``{name: sparse module}`` (weights ``[out, in]`` or ``[out, in/g, kh, kw]``).
        sparsity: target pruned fraction of all the layers' weights, in [0, 1].
        min_density: floor on each layer's kept fraction, in [0, 1], or None (the default floor).

    Returns:
        ``{name: bool mask}`` of each weight's shape, within the current masks. When the current
        masks keep fewer weights than the target, they are returned unchanged.

    Raises:
        ValueError: a non-finite weight (naming its layer); explicit floors that exceed the
            target (e.g. ``min_density > 1 - sparsity``).
    """
    scores = MagnitudeImportance()(layers)
    return score_masks(layers, scores, sparsity, "global", min_density, "global_magnitude_masks")


class GlobalMagnitudePruner(ImportancePruner):
    """Global magnitude pruning (Gupta et al. 2022): all pruned layers ranked together by |w|
    (:class:`ImportancePruner` with ``MagnitudeImportance()`` and ``scope="global"``).

    Lifecycle::

        pruner = GlobalMagnitudePruner(model, opt, sparsity=0.95, min_density=0.01)
        ... train dense: opt.step(); pruner.step()
        kept = pruner.prune()               # one shot (or schedule=Geometric(0.95, rounds=3))
        ... fine-tune: opt.step(); pruner.step()
        summary = pruner.finalize()

    Exactly ``round((1 - sparsity) N)`` of the ``N`` weights stay; a pruned weight never returns.

    Args:
        model, optimizer, sparsity, schedule, layers, regularization, reg_strength: see
            :class:`BasePruner` (one sparsity for all layers together).
        min_density: minimum kept fraction per layer, at most ``1 - sparsity``. None (default):
            ``min(1%, (1 - s) / 2)`` of each layer and at least one weight, so that no layer
            collapses; 0: pure global ranking (a layer left empty is warned about).
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
            importance=MagnitudeImportance(),
            scope="global",
            min_density=min_density,
            **base,
        )

    def _config(self) -> dict:
        return {"min_density": self.min_density}
