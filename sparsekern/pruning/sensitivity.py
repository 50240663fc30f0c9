"""Han et al.'s sensitivity analysis: prune one layer at a time over a range of quality
parameters, watch the accuracy, and pick per-layer qualities from the curves.

Han (Fig. 5): conv layers are more sensitive than FC layers, and conv1 (3 input channels) the most.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsekern.nn.masks import set_mask
from sparsekern.pruning._layers import require_sparse_layers, sparse_layers
from sparsekern.pruning.magnitude import magnitude_mask

__all__ = ["SensitivityResult", "sensitivity_analysis", "choose_qualities"]


@dataclass
class SensitivityResult:
    """Accuracy of the model with one layer pruned at a time.

    Attributes:
        baseline: ``evaluate(model)`` with nothing pruned (beyond the masks it came with).
        qualities: the quality parameters tried, ascending.
        accuracy: ``{layer: [metric at qualities[i]]}``.
        kept: ``{layer: [kept fraction of the layer's weights at qualities[i]]}``.
        higher_is_better: False for a metric such as a loss (then "drop" is its increase).
    """

    baseline: float
    qualities: list[float]
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    kept: dict[str, list[float]] = field(default_factory=dict)
    higher_is_better: bool = True

    def drop(self, layer: str) -> list[float]:
        """How much worse than the baseline each quality makes ``layer`` (positive = worse)."""
        sign = 1.0 if self.higher_is_better else -1.0
        return [sign * (self.baseline - a) for a in self.accuracy[layer]]

    def table(self) -> str:
        """A text table: one row per layer and quality (metric, drop, kept %)."""
        lines = [f"baseline {self.baseline:.4f}", f"{'layer':<16}{'q':>7}{'metric':>10}"
                 f"{'drop':>10}{'kept %':>9}"]  # fmt: skip
        for layer in self.accuracy:
            for q, a, d, k in zip(
                self.qualities, self.accuracy[layer], self.drop(layer), self.kept[layer]
            ):
                lines.append(f"{layer:<16}{q:>7.3f}{a:>10.4f}{d:>10.4f}{100 * k:>9.2f}")
        return "\n".join(lines)


@torch.no_grad()
def sensitivity_analysis(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    qualities: Iterable[float],
    layers: Sequence[str] | None = None,
    higher_is_better: bool = True,
) -> SensitivityResult:
    """Prune each layer alone at each quality, evaluate, and put the layer back.

    Every trial starts from the model as given: for a layer and a quality the layer's mask becomes
    ``mask & |w| > q * std(surviving w)`` (through ``set_mask``), ``evaluate(model)`` is called,
    then the layer's mask and weights are restored bit for bit (also if ``evaluate`` raises). No
    copy of the model is made, so memory stays at one layer's weights.

    Args:
        model: a model with sparse layers.
        evaluate: ``model -> metric`` (e.g. validation accuracy); it should not train the model.
        qualities: quality parameters to try (sorted ascending in the result).
        layers: names of the sparse layers to analyse; default all.
        higher_is_better: whether a larger metric is better (accuracy) or worse (a loss).

    Returns:
        A :class:`SensitivityResult` (``len(qualities)`` evaluations per layer, plus one baseline).
    """
    all_layers = require_sparse_layers(model, "sensitivity_analysis")
    chosen = sparse_layers(model, layers) if layers is not None else all_layers
    qs = sorted(float(q) for q in qualities)
    if not qs:
        raise ValueError("sensitivity_analysis: expected at least one quality, got none")
    result = SensitivityResult(float(evaluate(model)), qs, higher_is_better=higher_is_better)
    for name, m in chosen.items():
        saved_mask = m.mask.clone()
        saved_weight = m.weight.detach().clone()
        accs, kept = [], []
        try:
            for q in qs:
                new = magnitude_mask(saved_weight, saved_mask, q)
                set_mask(m, new)
                kept.append(int(new.count_nonzero()) / new.numel())
                with torch.enable_grad():  # evaluate's business whether it needs autograd
                    accs.append(float(evaluate(model)))
        finally:
            set_mask(m, saved_mask)
            m.weight.copy_(saved_weight)
        result.accuracy[name] = accs
        result.kept[name] = kept
    return result


def choose_qualities(
    result: SensitivityResult, max_drop: float, contiguous: bool = True
) -> dict[str, float]:
    """Per layer, the largest quality whose metric drop stays within ``max_drop``.

    Args:
        result: from :func:`sensitivity_analysis`.
        max_drop: the allowed drop from the baseline (same units as the metric, e.g. 0.005 for
            half a point of accuracy in [0, 1]); a drop equal to it is allowed.
        contiguous: if True (default) only the run of qualities from the smallest up to the first
            one over budget counts, so a lucky point past a failing one (accuracy curves are
            noisy) is not picked.

    Returns:
        ``{layer: quality}``; 0.0 for a layer over budget even at the smallest quality (quality 0
        prunes only weights that are exactly zero). Feed it to ``HanPruner(quality=...)``.
    """
    # 0.99 - 0.985 is 0.005000000000000004 in floats: allow for the subtraction's rounding
    slack = 1e-12 * max(1.0, abs(result.baseline))
    out = {}
    for layer in result.accuracy:
        best = 0.0
        for q, d in zip(result.qualities, result.drop(layer)):
            if d <= max_drop + slack:
                best = q
            elif contiguous:
                break
        out[layer] = best
    return out
