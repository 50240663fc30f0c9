"""Global magnitude pruning (Gupta et al. 2022): rank the weights of all layers together by |w| and
keep the largest, with an optional minimum kept fraction per layer so that no layer collapses at
high sparsity."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsekern.pruning._common import (
    AUTO_MIN_DENSITY,
    auto_min_density,
    check_fraction,
    topk_mask,
    warn_collapsed,
)
from sparsekern.pruning.base import BasePruner, Closure
from sparsekern.pruning.schedules import Schedule

__all__ = ["AUTO_MIN_DENSITY", "GlobalMagnitudePruner", "global_magnitude_masks"]


@torch.no_grad()
def global_magnitude_masks(
    layers: dict[str, nn.Module], sparsity: float, min_density: float | None = 0.0
) -> dict[str, torch.Tensor]:
    """New masks keeping exactly ``round((1 - sparsity) * N)`` weights of the ``N`` weights of
    ``layers``: the largest ``|w|`` over all layers together, among the weights each mask still
    keeps (a pruned weight never returns).

    With ``min_density > 0`` every layer first keeps its ``ceil(min_density * numel)`` largest
    surviving weights (all of them if it has fewer); the rest of the budget goes to the largest
    remaining ``|w|`` globally. ``min_density=None`` is the pruners' default floor,
    :func:`~sparsekern.pruning._common.auto_min_density` (1% of each layer, or half the target
    density where lower; dropped, with a warning, if the floors alone would not fit). With no
    floor, a layer left with no weight is warned about (RuntimeWarning: layer collapse).

    Args:
        layers: ``{name: sparse module}`` (weights ``[out, in]`` or ``[out, in/g, kh, kw]``).
        sparsity: target pruned fraction of all the layers' weights, in [0, 1].
        min_density: floor on each layer's kept fraction, in [0, 1], or None (the default floor).

    Returns:
        ``{name: bool mask}`` of each weight's shape, within the current masks. When the current
        masks keep fewer weights than the target, they are returned unchanged.

    Raises:
        ValueError: the floors alone exceed the target (e.g. ``min_density > 1 - sparsity``).
    """
    check_fraction(sparsity, "global_magnitude_masks")
    auto = min_density is None
    if auto:
        min_density = auto_min_density(sparsity)
    check_fraction(min_density, "global_magnitude_masks", "min_density")
    names = list(layers)
    total = sum(layers[n].weight.numel() for n in names)
    target = round((1.0 - sparsity) * total)
    alive = sum(int(layers[n].mask.count_nonzero()) for n in names)
    if alive <= target:
        return {n: layers[n].mask.clone() for n in names}
    scores = []
    floors = 0
    for n in names:
        m = layers[n]
        # float64: |w| ties between float32 values stay ties; pruned entries rank below every
        # surviving one (-1 < 0 <= |w|)
        s = m.weight.detach().abs().double().masked_fill(~m.mask, -1.0)
        if min_density > 0:
            floor = min(math.ceil(min_density * m.weight.numel()), int(m.mask.count_nonzero()))
            floors += floor
            # the floor's weights are taken first: lift them above every other score
            s = s.masked_fill(topk_mask(s, floor), math.inf)
        scores.append(s.flatten())
    if floors > target and auto:
        # many tiny layers: the rounded-up floors alone exceed the budget; rank without them
        return global_magnitude_masks(layers, sparsity, 0.0)
    if floors > target:
        raise ValueError(
            f"global_magnitude_masks: expected the per-layer floors (min_density {min_density}: "
            f"{floors} weights) to fit in the target of {target} kept weights "
            f"(sparsity {sparsity}); lower min_density"
        )
    keep = topk_mask(torch.cat([s.to(scores[0].device) for s in scores]), target)
    out, i = {}, 0
    for n in names:
        k = layers[n].weight.numel()
        out[n] = keep[i : i + k].view_as(layers[n].mask).to(layers[n].mask.device)
        i += k
    if min_density == 0:
        warn_collapsed(out, "global_magnitude_masks")
    return out


class GlobalMagnitudePruner(BasePruner):
    """Global magnitude pruning (Gupta et al. 2022): all pruned layers ranked together by |w|.

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
            1% of each layer, or half the target density where lower, so that no layer
            collapses; 0: pure global ranking (a layer left empty is warned about).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sparsity: float | None = None,
        schedule: Schedule | None = None,
        min_density: float | None = None,
        layers=None,
        regularization: str = "none",
        reg_strength: float = 0.0,
    ) -> None:
        super().__init__(
            model,
            optimizer,
            sparsity=sparsity,
            schedule=schedule,
            layers=layers,
            regularization=regularization,
            reg_strength=reg_strength,
        )
        self.min_density = (
            None
            if min_density is None
            else check_fraction(min_density, "GlobalMagnitudePruner", "min_density")
        )
        final = sparsity if schedule is None else schedule.final
        if final is not None and self.min_density is not None and self.min_density > 1.0 - final:
            raise ValueError(
                f"GlobalMagnitudePruner: expected min_density <= 1 - sparsity = "
                f"{1 - final:.4g}, got {self.min_density}"
            )

    @torch.no_grad()
    def compute_masks(self, sparsity: float, closure: Closure | None = None) -> dict:
        """The global top-``(1 - sparsity)`` masks (:func:`global_magnitude_masks`)."""
        return global_magnitude_masks(self.layers, sparsity, self.min_density)

    def _config(self) -> dict:
        return {"min_density": self.min_density}
