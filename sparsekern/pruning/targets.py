"""Per-layer target sparsities: from a sensitivity analysis, or in given proportions.

Both return ``{layer name: sparsity}`` for :class:`~sparsekern.pruning.HanPruner` (or any pruner
with per-layer targets), usually through a :class:`~sparsekern.pruning.schedules.Geometric`
schedule that reaches them over several rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from sparsekern.pruning._common import allocate_counts
from sparsekern.pruning.sensitivity import SensitivityResult, choose_qualities

__all__ = ["SensitivityTargets", "han_targets", "proportional_targets", "sensitivity_targets"]


@dataclass
class SensitivityTargets:
    """What :func:`sensitivity_targets` chose, per layer.

    Attributes:
        sparsity: ``{layer: target sparsity}`` (0 for a layer over budget at every quality).
        budget: ``{layer: allowed metric drop}``.
        quality: ``{layer: the largest quality within the budget}`` (0: none).
    """

    sparsity: dict[str, float] = field(default_factory=dict)
    budget: dict[str, float] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)


def sensitivity_targets(
    result: SensitivityResult, layers: dict[str, nn.Module], max_drop: float
) -> SensitivityTargets:
    """Per-layer target sparsities from a sensitivity analysis (Han Fig. 6).

    Each layer may cost ``max_drop x sqrt(its share of the weights)`` of the metric, alone: the
    budget goes where the weights are. On LeNet-300-100 that gives fc1 0.94, fc2 0.34 and fc3
    0.06 of ``max_drop``; a flat budget pruned the small layers hardest (fc2 4%, fc3 12% kept at
    fc1 5%) and lost 0.3 points more after retraining. The layer's target is the sparsity it
    reached at the largest quality within budget (:func:`choose_qualities`, contiguous).

    Args:
        result: from :func:`sparsekern.pruning.sensitivity_analysis`.
        layers: ``{name: sparse module}`` (the weights' sizes set the budgets); every layer of
            ``result`` must be in it.
        max_drop: the metric drop allowed for a layer holding all the weights (e.g. accuracy
            points), > 0.

    Returns:
        A :class:`SensitivityTargets`.
    """
    if not (max_drop > 0 and math.isfinite(max_drop)):
        raise ValueError(f"sensitivity_targets: expected max_drop > 0, got {max_drop}")
    missing = [n for n in result.accuracy if n not in layers]
    if missing:
        raise KeyError(f"sensitivity_targets: expected layers for {missing}, got {list(layers)}")
    total = sum(m.weight.numel() for m in layers.values())
    out = SensitivityTargets()
    for n in result.accuracy:
        budget = max_drop * math.sqrt(layers[n].weight.numel() / total)
        q = choose_qualities(result, budget)[n]
        out.budget[n], out.quality[n] = budget, q
        # the kept fraction at that quality, one-shot; q = 0: over budget everywhere
        kept = result.kept[n][result.qualities.index(q)] if q > 0 else 1.0
        out.sparsity[n] = 1.0 - kept
    return out


def proportional_targets(
    layers: dict[str, nn.Module], kept: dict[str, float], sparsity: float
) -> dict[str, float]:
    """Per-layer sparsities whose kept fractions are proportional to ``kept`` (e.g. Han's
    Table 2 for LeNet-300-100: fc1 8, fc2 9, fc3 26 %) and whose total is exactly ``sparsity``
    (up to one weight): layers that would keep more than all their weights are made dense and
    the rest rescaled (the solver of RigL's ERK).

    Args:
        layers: ``{name: sparse module}``.
        kept: ``{name: relative kept fraction > 0}`` for every layer of ``layers``.
        sparsity: the overall pruned fraction, in [0, 1].

    Returns:
        ``{name: sparsity}``.
    """
    if set(kept) != set(layers):
        raise KeyError(
            f"proportional_targets: expected proportions for {sorted(layers)}, got {sorted(kept)}"
        )
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"proportional_targets: expected a sparsity in [0, 1], got {sparsity}")
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    counts = allocate_counts({n: float(kept[n]) for n in layers}, sizes, 1.0 - sparsity)
    return {n: 1.0 - counts[n] / sizes[n] for n in layers}


def han_targets(
    layers: dict[str, nn.Module],
    paper_kept: dict[str, float],
    *,
    sparsity: float | dict | None = None,
    sensitivity: dict[str, float] | None = None,
) -> dict:
    """Each layer's final sparsity for Han's iterative pruning, from (the first given of):

    * ``sparsity`` per layer (``{name | "conv" | "fc" | "*": s}``): as given;
    * ``sparsity`` as one number: the paper's kept proportions scaled so that the whole model
      reaches it (:func:`proportional_targets`);
    * ``sensitivity``: ``{layer: sparsity}`` from :func:`sensitivity_targets`;
    * else the paper's own kept fractions ``paper_kept`` (``{layer: kept fraction}``, e.g. Han's
      Table 2 / 4 / 5), as sparsities.
    """
    if isinstance(sparsity, dict):
        return dict(sparsity)
    if sparsity is not None:
        return proportional_targets(layers, paper_kept, sparsity)
    if sensitivity is not None:
        return dict(sensitivity)
    return {n: 1.0 - k for n, k in paper_kept.items()}
