"""Gradual magnitude pruning (Zhu and Gupta 2017, "To prune, or not to prune"): the sparsity rises
on a cubic schedule

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,   t in {t0, t0 + dt, ..., t0 + n dt},

pruning every ``dt`` steps from step ``t0`` over ``n`` pruning steps: fast at first, while there
are many redundant weights, slower towards ``s_f``. Each pruning step removes the smallest |w|
of each layer (``scope="layer"``, as in the paper) or of all layers together (``scope="global"``,
Gupta et al. 2022's recommendation); a pruned weight never returns.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.pruning._common import check_fraction, topk_mask
from sparsekern.pruning.base import BasePruner, Closure
from sparsekern.pruning.global_magnitude import global_magnitude_masks
from sparsekern.pruning.schedules import Cubic

__all__ = ["GradualPruner"]

SCOPES = ("layer", "global")


class GradualPruner(BasePruner):
    """Gradual magnitude pruning on Zhu and Gupta's cubic schedule, driven by :meth:`step`.

    Lifecycle::

        pruner = GradualPruner(model, opt, sparsity=0.9, begin_step=500, end_step=5000,
                               frequency=100)
        for x, y in loader:                 # one loop from the dense start to the end
            loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
            pruner.step()                   # prunes at t0, t0 + dt, ..., t0 + n dt
        summary = pruner.finalize()

    ``pruner.schedule`` is the :class:`~sparsekern.pruning.schedules.Cubic` these arguments
    build.

    Args:
        model, optimizer, layers, regularization, reg_strength: see :class:`BasePruner`.
        sparsity: ``s_f``, reached at ``end_step``.
        begin_step: ``t0``, the first pruning step (optimizer steps done).
        end_step: ``t0 + n dt``, the last pruning step; ``end_step - begin_step`` a positive
            multiple of ``frequency``.
        frequency: ``dt``, steps between pruning steps (Zhu and Gupta: 100 to 1000).
        initial_sparsity: ``s_i`` (usually 0).
        scope: ``"layer"`` (every layer pruned to ``s_t``, as in the paper) or ``"global"`` (all
            layers ranked together to ``s_t``, Gupta et al.'s recommendation).
        min_density: with ``scope="global"``, the minimum kept fraction per layer; None
            (default): 1% of each layer, or half the target density where lower (see
            :func:`~sparsekern.pruning.global_magnitude_masks`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sparsity: float,
        begin_step: int,
        end_step: int,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
        scope: str = "layer",
        min_density: float | None = None,
        layers=None,
        regularization: str = "none",
        reg_strength: float = 0.0,
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"GradualPruner: expected scope in {SCOPES}, got {scope!r}")
        schedule = Cubic(sparsity, begin_step, end_step, frequency, initial_sparsity)
        super().__init__(
            model,
            optimizer,
            schedule=schedule,
            layers=layers,
            regularization=regularization,
            reg_strength=reg_strength,
        )
        self.scope = scope
        self.min_density = (
            None
            if min_density is None
            else check_fraction(min_density, "GradualPruner", "min_density")
        )

    def sparsity_at(self, step: int) -> float:
        """The schedule's target sparsity at ``step``."""
        return self.schedule(step)

    @torch.no_grad()
    def compute_masks(self, sparsity: float, closure: Closure | None = None) -> dict:
        """Per layer (``scope="layer"``: each layer's ``round((1 - s) numel)`` largest |w|) or
        globally; never regrows a weight."""
        if self.scope == "global":
            return global_magnitude_masks(self.layers, sparsity, self.min_density)
        masks = {}
        for n, m in self.layers.items():
            keep = round((1.0 - sparsity) * m.weight.numel())
            if keep >= int(m.mask.count_nonzero()):
                continue
            score = m.weight.detach().abs().double().masked_fill(~m.mask, -1.0)
            masks[n] = topk_mask(score, keep)
        return masks

    def _config(self) -> dict:
        return {"scope": self.scope, "min_density": self.min_density}
