"""Pluggable scoring: where the scoring rule is the only difference between methods (global
magnitude, gradual magnitude, SNIP, ...), the rule is an :class:`Importance` object and the
selection is one function, :func:`score_masks` (Torch-Pruning's importance objects; torch.ao's
``BaseSparsifier.update_mask``).

An importance maps the pruner's layers to one score per weight (higher is kept)::

    pruner = ImportancePruner(model, opt, sparsity=0.9, importance=TaylorImportance(),
                              scope="global")
    pruner.prune(closure=lambda: F.cross_entropy(model(x), y))

Write one by subclassing :class:`Importance`: ``__call__(layers, closure) -> {name: score}``,
``needs_closure`` if it needs a gradient, ``config()`` for what a resumed run must match.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from sparsekern.pruning._common import (
    auto_min_density,
    check_fraction,
    dense_weight_grads,
    topk_mask,
    warn_collapsed,
)
from sparsekern.pruning.base import BasePruner, Closure

__all__ = [
    "SCOPES",
    "Importance",
    "ImportancePruner",
    "MagnitudeImportance",
    "RandomImportance",
    "TaylorImportance",
    "check_finite",
    "floor_count",
    "score_masks",
]

SCOPES = ("layer", "global")


def check_finite(t: torch.Tensor, name: str, who: str, what: str = "weight") -> None:
    """ValueError naming the layer if ``t`` holds NaN or inf (a NaN compares False with every
    threshold: without this check it would silently prune, or keep, a whole layer)."""
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        n = int(bad.count_nonzero())
        raise ValueError(
            f"{who}: expected finite {what}s, got {n} NaN/inf of {t.numel()} in layer {name!r}; "
            "fix the training (learning rate, loss scale) or the checkpoint before pruning"
        )


def floor_count(min_density: float, numel: int) -> int:
    """Kept entries the floor ``min_density`` guarantees a layer of ``numel``: 0 without a floor,
    else ``max(1, ceil(min_density * numel))`` (never an empty layer)."""
    if min_density <= 0 or numel == 0:
        return 0
    return min(numel, max(1, math.ceil(min_density * numel)))


class Importance:
    """A scoring rule: ``{layer name: score}`` per weight, the weight's shape, higher is kept.

    Attributes:
        needs_closure: whether ``__call__`` needs the closure (a gradient).
    """

    needs_closure = False

    def __call__(
        self, layers: dict[str, nn.Module], closure: Closure | None = None
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config(self) -> dict:
        """The rule and its parameters, compared by ``load_state_dict``."""
        return {"type": type(self).__name__}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


class MagnitudeImportance(Importance):
    """``|w|`` (``p=1``) or ``w^2`` (``p=2``; the same ranking): magnitude pruning (Han et al.
    2015; Zhu and Gupta 2017; Gupta et al. 2022)."""

    def __init__(self, p: int = 1) -> None:
        if p not in (1, 2):
            raise ValueError(f"MagnitudeImportance: expected p 1 or 2, got {p!r}")
        self.p = p

    @torch.no_grad()
    def __call__(self, layers, closure=None):
        out = {}
        for n, m in layers.items():
            w = m.weight.detach()
            check_finite(w, n, type(self).__name__)
            # float64: |w| ties between float32 values stay ties
            out[n] = w.abs().double() if self.p == 1 else w.double() ** 2
        return out

    def config(self) -> dict:
        return {"type": "MagnitudeImportance", "p": self.p}


class TaylorImportance(Importance):
    """First-order Taylor ``|g * w|`` with the *dense* gradient ``g`` of the closure's loss
    (pruned entries included): SNIP's connection sensitivity (Lee et al. 2019).

    Attributes:
        last: the scores of the last call.
    """

    needs_closure = True

    def __call__(self, layers, closure=None):
        if closure is None:
            raise ValueError(
                "TaylorImportance: expected a closure returning the loss on a batch (the score "
                "|g * w| needs its gradient), got None"
            )
        grads = dense_weight_grads(layers, closure)
        out = {}
        for n, g in grads.items():
            w = layers[n].weight.detach()
            check_finite(w, n, "TaylorImportance")
            check_finite(g, n, "TaylorImportance", "gradient")
            out[n] = (g.double() * w.double()).abs()
        self.last = {n: s.float() for n, s in out.items()}
        return out


class RandomImportance(Importance):
    """Uniform random scores: the random-pruning baseline (and RigL's initial masks)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, layers, closure=None):
        return {
            n: torch.rand(m.weight.shape, generator=self.generator, dtype=torch.float64).to(
                m.weight.device
            )
            for n, m in layers.items()
        }


@torch.no_grad()
def score_masks(
    layers: dict[str, nn.Module],
    scores: dict[str, torch.Tensor],
    sparsity: float | dict,
    scope: str = "global",
    min_density: float | None = None,
    who: str = "score_masks",
) -> dict[str, torch.Tensor]:
    """New masks keeping the highest ``scores`` among the weights each mask still keeps (a pruned
    weight never returns).

    ``scope="layer"``: each layer keeps ``round((1 - s_l) numel)`` (``sparsity`` a number or
    ``{layer: s or None}``, None: left alone). ``scope="global"``: exactly
    ``round((1 - s) N)`` of all ``N`` weights, ranked together. The floor (``min_density``, see
    ``docs/pruning.md``): every layer keeps at least :func:`floor_count` weights, its highest
    scores; ``None`` is ``min(0.01, (1 - s) / 2)``; where a per-layer target falls below the
    floor, the floor wins and a RuntimeWarning names the layer. With ``min_density=0`` a layer
    left empty is warned about (layer collapse).

    Args:
        layers: ``{name: sparse module}``.
        scores: ``{name: finite score}`` of each weight's shape (higher is kept).
        sparsity: target pruned fraction, in [0, 1].
        scope: ``"layer"`` or ``"global"``.
        min_density: floor on each layer's kept fraction, in [0, 1], or None.

    Returns:
        ``{name: bool mask}`` for the layers the target covers, within the current masks; a
        layer already at or below its target keeps its mask.

    Raises:
        ValueError: a non-finite score (naming the layer); an explicit floor that does not fit
            in a global target.
    """
    if scope not in SCOPES:
        raise ValueError(f"{who}: expected scope in {SCOPES}, got {scope!r}")
    if set(scores) - set(layers):
        raise KeyError(f"{who}: scores for unknown layers {sorted(set(scores) - set(layers))}")
    for n, s in scores.items():
        check_finite(s, n, who, "score")
    if scope == "global":
        if isinstance(sparsity, dict):
            raise TypeError(
                f"{who}: expected one sparsity for all layers (scope='global'), got a dict"
            )
        return _global(layers, scores, check_fraction(sparsity, who), min_density, who)
    per = (
        {n: sparsity.get(n) for n in scores}
        if isinstance(sparsity, dict)
        else dict.fromkeys(scores, sparsity)
    )
    out, raised = {}, []
    for n, s in scores.items():
        if per[n] is None:
            continue
        sp = check_fraction(per[n], who)
        md = auto_min_density(sp) if min_density is None else min_density
        m = layers[n]
        alive = int(m.mask.count_nonzero())
        target = round((1.0 - sp) * m.mask.numel())
        keep = min(alive, max(target, floor_count(md, m.mask.numel())))
        if keep > target:
            raised.append(f"{n} ({keep} kept, target {target})")
        if keep >= alive:
            out[n] = m.mask.clone()
            continue
        out[n] = topk_mask(s.double().masked_fill(~m.mask.to(s.device), -math.inf), keep).to(
            m.mask.device
        )
    if raised:
        warnings.warn(
            f"{who}: the min_density floor keeps more than the target in {', '.join(raised)} "
            "(a layer is never emptied unless min_density=0)",
            RuntimeWarning,
            stacklevel=3,
        )
    if min_density == 0:
        warn_collapsed(out, who)
    return out


def _global(layers, scores, sparsity, min_density, who):
    auto = min_density is None
    md = auto_min_density(sparsity) if auto else check_fraction(min_density, who, "min_density")
    names = list(scores)
    total = sum(layers[n].mask.numel() for n in names)
    target = round((1.0 - sparsity) * total)
    alive = sum(int(layers[n].mask.count_nonzero()) for n in names)
    if alive <= target:
        return {n: layers[n].mask.clone() for n in names}
    ranked, floors = [], {}
    for n in names:
        m = layers[n]
        s = scores[n].double().masked_fill(~m.mask.to(scores[n].device), -math.inf)
        floors[n] = min(floor_count(md, m.mask.numel()), int(m.mask.count_nonzero()))
        ranked.append(s)
    if sum(floors.values()) > target:
        if not auto:
            raise ValueError(
                f"{who}: expected the per-layer floors (min_density {md}: "
                f"{sum(floors.values())} weights) to fit in the target of {target} kept weights "
                f"(sparsity {sparsity}); lower min_density"
            )
        # many tiny layers: the default floors alone exceed the budget; one weight each, if that
        # fits, else none
        one = {n: min(1, f) for n, f in floors.items()}
        floors = one if sum(one.values()) <= target else dict.fromkeys(names, 0)
        warnings.warn(
            f"{who}: the default min_density floors do not fit in {target} kept weights; "
            f"{'one weight per layer' if sum(floors.values()) else 'no floor'} instead",
            RuntimeWarning,
            stacklevel=4,
        )
    flat = []
    for n, s in zip(names, ranked):
        if floors[n]:
            s = s.masked_fill(topk_mask(s, floors[n]), math.inf)  # the floor goes first
        flat.append(s.flatten().cpu())
    keep = topk_mask(torch.cat(flat), target)
    out, i = {}, 0
    for n in names:
        k = layers[n].mask.numel()
        out[n] = keep[i : i + k].view_as(layers[n].mask).to(layers[n].mask.device)
        i += k
    if not any(floors.values()):
        warn_collapsed(out, who)
    return out


class ImportancePruner(BasePruner):
    """Prune by a pluggable :class:`Importance`: per layer or globally, with the
    ``min_density`` floor; a pruned weight never returns.

    Lifecycle::

        pruner = ImportancePruner(model, opt, sparsity=0.9, importance=MagnitudeImportance())
        ... train: opt.step(); pruner.step(closure)
        kept = pruner.prune(closure=closure)    # the closure: for importances with a gradient

    Args:
        model, optimizer, sparsity, schedule, layers, regularization, reg_strength: see
            :class:`BasePruner` (``**base``).
        importance: the scoring rule (default ``MagnitudeImportance()``).
        scope: ``"global"`` (default) or ``"layer"``.
        min_density: the floor (``docs/pruning.md``); None: ``min(0.01, (1 - s) / 2)``.
    """

    per_layer_targets = True
    monotone = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        importance: Importance | None = None,
        scope: str = "global",
        min_density: float | None = None,
        **base,
    ) -> None:
        who = type(self).__name__
        if scope not in SCOPES:
            raise ValueError(f"{who}: expected scope in {SCOPES}, got {scope!r}")
        importance = MagnitudeImportance() if importance is None else importance
        if not isinstance(importance, Importance):
            raise TypeError(
                f"{who}: expected an Importance (sparsekern.pruning.importance), got "
                f"{type(importance).__name__}"
            )
        if scope == "global" and isinstance(base.get("sparsity"), dict):
            raise TypeError(
                f"{who}: expected one sparsity for all layers (scope='global'), got a dict"
            )
        super().__init__(model, optimizer, **base)
        self.importance, self.scope = importance, scope
        self.min_density = None if min_density is None else check_fraction(
            min_density, who, "min_density"
        )  # fmt: skip
        final = self.sparsity if self.schedule is None else self.schedule.final
        if (
            scope == "global"
            and isinstance(final, float)
            and self.min_density is not None
            and self.min_density > 1.0 - final
        ):
            raise ValueError(
                f"{who}: expected min_density <= 1 - sparsity = {1 - final:.4g}, got "
                f"{self.min_density}"
            )

    def _check_target(self, value, what: str):
        if isinstance(value, dict) and getattr(self, "scope", None) == "global":
            raise TypeError(
                f"{type(self).__name__}: expected one sparsity for all layers "
                "(scope='global'), got a dict"
            )
        return super()._check_target(value, what)

    def compute_masks(self, sparsity, closure: Closure | None = None) -> dict:
        """Score with :attr:`importance`, keep the top per layer or globally
        (:func:`score_masks`)."""
        if self.importance.needs_closure and closure is None:
            raise ValueError(
                f"{type(self).__name__}.prune: {self.importance!r} needs a closure returning the "
                "loss on a batch, got None"
            )
        scores = self.importance(self.layers, closure)
        target = self._per_layer(sparsity) if isinstance(sparsity, dict) else sparsity
        return score_masks(
            self.layers, scores, target, self.scope, self.min_density, type(self).__name__
        )

    def _config(self) -> dict:
        return {
            "importance": self.importance.config(),
            "scope": self.scope,
            "min_density": self.min_density,
        }
