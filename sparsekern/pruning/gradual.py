"""Gradual magnitude pruning (Zhu and Gupta 2017, "To prune, or not to prune"): the sparsity rises
on a cubic schedule

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,   t in {t0, t0 + dt, ..., t0 + n dt},

pruning every ``dt`` steps from step ``t0`` over ``n`` pruning steps: fast at first, while there
are many redundant weights, slower towards ``s_f``. Each pruning step removes the smallest |w|
of each layer (``scope="layer"``, as in the paper) or of all layers together (``scope="global"``,
Gupta et al. 2022's recommendation); a pruned weight never returns. The selection is the one of
every scored pruner (:func:`~sparsekern.pruning.importance.score_masks`); ``importance=`` swaps
the score (e.g. ``TaylorImportance()`` for gradual first-order pruning).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.pruning.importance import SCOPES, Importance, ImportancePruner
from sparsekern.pruning.schedules import Cubic

__all__ = ["GradualPruner"]


class GradualPruner(ImportancePruner):
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
        min_density: the floor on each layer's kept fraction; None (default):
            ``min(1%, (1 - s_t) / 2)`` and at least one weight (see ``docs/pruning.md``). Not in
            the paper (a guard against emptying a layer; it binds only where ``round((1 - s_t)
            numel)`` is below it); 0 removes it.
        importance: the score (default ``MagnitudeImportance()``, the paper's).
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
        importance: Importance | None = None,
        **base,
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"GradualPruner: expected scope in {SCOPES}, got {scope!r}")
        if "schedule" in base:
            raise TypeError("GradualPruner: the schedule is Cubic(sparsity, begin_step, ...)")
        schedule = Cubic(sparsity, begin_step, end_step, frequency, initial_sparsity)
        super().__init__(
            model,
            optimizer,
            schedule=schedule,
            importance=importance,
            scope=scope,
            min_density=min_density,
            **base,
        )

    def sparsity_at(self, step: int) -> float:
        """The schedule's target sparsity at ``step``."""
        return self.schedule(step)

    def _config(self) -> dict:
        cfg = {"scope": self.scope, "min_density": self.min_density}
        if self.importance.config() != {"type": "MagnitudeImportance", "p": 1}:
            cfg["importance"] = self.importance.config()
        return cfg
