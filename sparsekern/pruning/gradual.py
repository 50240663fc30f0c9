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

from sparsekern.pruning._common import MaskPruner, check_fraction, topk_mask
from sparsekern.pruning.global_magnitude import global_magnitude_masks

__all__ = ["GradualPruner", "cubic_sparsity"]

SCOPES = ("layer", "global")


def cubic_sparsity(
    step: int, final_sparsity: float, begin_step: int, n: int, dt: int, initial_sparsity=0.0
) -> float:
    """Zhu and Gupta's target sparsity at ``step``: ``initial_sparsity`` before ``begin_step``
    (t0), ``final_sparsity`` from ``t0 + n dt`` on, the cubic in between.

    Args:
        step: the training step t (optimizer steps done).
        final_sparsity: s_f in [0, 1]. initial_sparsity: s_i in [0, s_f].
        begin_step: t0 >= 0. n: number of pruning steps >= 1. dt: steps between them >= 1.
    """
    if n < 1 or dt < 1 or begin_step < 0:
        raise ValueError(
            f"cubic_sparsity: expected n >= 1, dt >= 1, begin_step >= 0, got n={n}, dt={dt}, "
            f"begin_step={begin_step}"
        )
    if not 0.0 <= initial_sparsity <= final_sparsity <= 1.0:
        raise ValueError(
            "cubic_sparsity: expected 0 <= initial_sparsity <= final_sparsity <= 1, got "
            f"{initial_sparsity}, {final_sparsity}"
        )
    frac = min(max((step - begin_step) / (n * dt), 0.0), 1.0)
    if frac in (0.0, 1.0):  # exactly s_i / s_f at the ends, not up to float rounding
        return initial_sparsity if frac == 0.0 else final_sparsity
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3


class GradualPruner(MaskPruner):
    """Gradual magnitude pruning on the cubic schedule, driven by :meth:`step`.

    Lifecycle::

        pruner = GradualPruner(model, final_sparsity=0.9, begin_step=500, end_step=5000,
                               frequency=100, optimizer=opt)
        for x, y in loader:                 # one loop from the dense start to the end
            loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
            pruner.step()                   # prunes on t0, t0 + dt, ..., t0 + n dt
        summary = pruner.finalize()

    Args:
        model: a model with sparse layers.
        final_sparsity: s_f, reached at ``end_step``.
        begin_step: t0, the first pruning step (optimizer steps done).
        end_step: ``t0 + n dt``, the last pruning step; ``end_step - begin_step`` must be a
            multiple of ``frequency``.
        frequency: dt, steps between pruning steps (Zhu and Gupta: 100 to 1000).
        optimizer: its state is zeroed at pruned entries.
        initial_sparsity: s_i (usually 0).
        scope: ``"layer"`` (every layer pruned to s_t) or ``"global"`` (all layers ranked
            together to s_t overall).
        min_density: with ``scope="global"``, the minimum kept fraction per layer.
        layers: restrict to these sparse-layer names (default: all).
    """

    name = "gradual"

    def __init__(
        self,
        model: nn.Module,
        final_sparsity: float,
        begin_step: int,
        end_step: int,
        frequency: int = 100,
        optimizer: torch.optim.Optimizer | None = None,
        initial_sparsity: float = 0.0,
        scope: str = "layer",
        min_density: float = 0.0,
        layers=None,
    ) -> None:
        super().__init__(model, optimizer, layers)
        if scope not in SCOPES:
            raise ValueError(f"GradualPruner: expected scope in {SCOPES}, got {scope!r}")
        if frequency < 1 or begin_step < 0 or end_step <= begin_step:
            raise ValueError(
                "GradualPruner: expected frequency >= 1 and 0 <= begin_step < end_step, got "
                f"frequency={frequency}, begin_step={begin_step}, end_step={end_step}"
            )
        if (end_step - begin_step) % frequency:
            raise ValueError(
                f"GradualPruner: expected end_step - begin_step ({end_step - begin_step}) to be a "
                f"multiple of frequency ({frequency})"
            )
        self.final_sparsity = check_fraction(final_sparsity, "GradualPruner", "final_sparsity")
        self.initial_sparsity = check_fraction(initial_sparsity, "GradualPruner", "initial")
        cubic_sparsity(begin_step, final_sparsity, begin_step, 1, 1, initial_sparsity)  # validate
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.n = (end_step - begin_step) // frequency
        self.scope = scope
        self.min_density = check_fraction(min_density, "GradualPruner", "min_density")

    def sparsity_at(self, step: int) -> float:
        """The schedule's target sparsity at ``step``."""
        return cubic_sparsity(
            step, self.final_sparsity, self.begin_step, self.n, self.frequency,
            self.initial_sparsity,
        )  # fmt: skip

    def is_pruning_step(self, step: int) -> bool:
        return (
            self.begin_step <= step <= self.end_step
            and (step - self.begin_step) % self.frequency == 0
        )

    @torch.no_grad()
    def prune(self, sparsity: float) -> dict[str, float]:
        """Prune to ``sparsity`` now (per layer or global, by magnitude, never regrowing) and
        return ``{layer: kept fraction}``."""
        check_fraction(sparsity, "GradualPruner.prune")
        if self.scope == "global":
            masks = global_magnitude_masks(self.layers, sparsity, self.min_density)
        else:
            masks = {}
            for n, m in self.layers.items():
                keep = round((1.0 - sparsity) * m.weight.numel())
                alive = int(m.mask.count_nonzero())
                if keep >= alive:
                    continue
                score = m.weight.detach().abs().double().masked_fill(~m.mask, -1.0)
                masks[n] = topk_mask(score, keep)
        self._install(masks)
        return self._record(sparsity=sparsity)

    def step(self) -> None:
        """Per-optimizer-step hook: count the step; on a pruning step, prune to ``s_t``."""
        self.steps += 1
        if self.is_pruning_step(self.steps):
            self.prune(self.sparsity_at(self.steps))
