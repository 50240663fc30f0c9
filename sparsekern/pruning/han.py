"""``HanPruner``: Han et al. 2015's train -> prune -> retrain method on the :class:`BasePruner`
lifecycle (see ``docs/pruning.md`` for a full example)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from sparsekern.pruning._common import AUTO_MIN_DENSITY, auto_min_density, check_fraction
from sparsekern.pruning._layers import layer_kind, resolve_per_layer
from sparsekern.pruning.base import BasePruner, Closure
from sparsekern.pruning.dropout import apply_dropout_adjustment, find_dropout_feeds
from sparsekern.pruning.importance import floor_count
from sparsekern.pruning.magnitude import keep_at_least, magnitude_mask, quality_for_density

__all__ = ["HanPruner", "FREEZE_KINDS"]

FREEZE_KINDS = ("conv", "fc")


def _conv_or_fc(m: nn.Module) -> str | None:
    if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
        return layer_kind(m)
    return None


class HanPruner(BasePruner):
    """Han et al.'s magnitude pruning: per layer, prune ``|w| <= quality x std`` of the layer's
    surviving weights; retrain the survivors (never re-initialised) with L2, dropout shrunk with
    the connections, conv and FC layers optionally retrained in turn (the others frozen).

    Lifecycle::

        pruner = HanPruner(model, opt, schedule=Geometric({"fc1": 0.92, "fc2": 0.91}, rounds=5))
        ... train dense: loss = task + pruner.regularization_loss(); opt.step(); pruner.step()
        for r in range(5):                  # iterative pruning: one round per prune() call
            kept = pruner.prune()           # round r + 1 of the schedule
            ... retrain (conv frozen: pruner.freeze("conv"), then pruner.freeze("fc"))
        summary = pruner.finalize()

    The target of a round, in this order: ``prune(quality=q)`` (Han's rule at quality ``q``,
    a number or a per-layer dict); ``prune(sparsity)``; the schedule (Han: ``Geometric``, on the
    round clock); the constructor's ``sparsity``; the constructor's ``quality`` (which excludes
    ``sparsity`` and ``schedule``: both given is a ValueError). A sparsity
    target is reached per layer by the quality that hits it (:func:`quality_for_density`), so
    every mask is still Han's threshold rule. Layers a per-layer target does not cover are left
    alone. A pruned weight never returns: sparsity only grows, round after round.

    Args:
        model, optimizer, sparsity, schedule, layers: see :class:`BasePruner`; targets may be
            per layer (``{"fc1": 0.92, "conv": 0.5, "*": 0.8}``).
        quality: Han's quality parameter (threshold = quality x std of the layer's surviving
            weights), a number or a per-layer dict; not with ``sparsity`` or ``schedule``.
            Typical values come from :func:`sparsekern.pruning.sensitivity_analysis`.
        regularization: ``"l2"`` (default; Han: best after retraining), ``"l1"`` or ``"none"``.
        reg_strength: its coefficient, Caffe's weight decay (5e-4 for LeNet / AlexNet). Do not
            also set the optimizer's ``weight_decay``.
        dropout: adjust the dropout modules feeding each pruned layer after every round:
            ``p = p_o * sqrt(C_r / C_o)`` (Han Sec. 3.2).
        dropout_feeds: ``{dropout module name: layer name}``; default: found by tracing.
        min_density: a floor on each layer's kept fraction (not in Han; a guard against a round
            emptying a layer): a round that would go below keeps the largest-magnitude
            ``max(1, ceil(min_density * numel))`` survivors, with a RuntimeWarning. None
            (default, as every pruner): ``min(1%, (1 - s) / 2)`` at a sparsity target, 1% at a
            quality; 0: pure Han (a layer may end empty).

    Attributes:
        original_connections: ``{layer: C_io}``, kept connections at :meth:`prepare`.
        original_dropout: ``{dropout name: p}`` at :meth:`prepare`.
        frozen_kind: ``"conv"``, ``"fc"`` or None (see :meth:`freeze`).
    """

    per_layer_targets = True
    monotone = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        quality: float | dict | None = None,
        dropout: bool = True,
        dropout_feeds: dict[str, str] | None = None,
        min_density: float | None = None,
        **base,
    ) -> None:
        base.setdefault("regularization", "l2")
        base.setdefault("reg_strength", 5e-4)
        super().__init__(model, optimizer, **base)
        if quality is not None:
            self._check_quality(quality, "quality")
            if self.sparsity is not None or self.schedule is not None:
                # the sparsity / schedule would always win: quality would be silently ignored
                given = "sparsity" if self.sparsity is not None else "schedule"
                raise ValueError(
                    f"HanPruner: expected quality or {given}, got both ({given} targets win, "
                    "quality would be ignored); per round: prune(quality=q)"
                )
        self.quality = quality
        self.dropout = bool(dropout)
        self.dropout_feeds = dict(dropout_feeds) if dropout_feeds is not None else None
        self._given_feeds = self.dropout_feeds is not None
        self.min_density = (
            None if min_density is None else check_fraction(min_density, "HanPruner", "min_density")
        )
        self.original_connections: dict[str, int] = {}
        self.original_dropout: dict[str, float] = {}
        self._prepared = False
        self._frozen: list[tuple[torch.nn.Parameter, bool]] = []
        self.frozen_kind: str | None = None

    def _check_quality(self, quality, what: str) -> dict[str, float | None]:
        q = resolve_per_layer(self.layers, quality, f"HanPruner: {what}")  # typos: KeyError
        bad = {n: v for n, v in q.items() if v is not None and not (v >= 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"HanPruner: expected {what} >= 0, got {bad}")
        return q

    # ------------------------------------------------------------------ lifecycle
    def prepare(self) -> dict[str, int]:
        """Record what pruning is measured against: each layer's kept connections (``C_io``) and
        the ``p`` of each dropout module feeding one. The first :meth:`prune` calls it; call it
        yourself to re-base on the model as it is now.

        Returns:
            ``{layer name: C_io}``.
        """
        self.original_connections = {n: int(m.mask.count_nonzero()) for n, m in self.layers.items()}
        modules = dict(self.model.named_modules())
        if self.dropout_feeds is None:
            self.dropout_feeds = find_dropout_feeds(self.model) if self.dropout else {}
        for d, layer in self.dropout_feeds.items():
            if d not in modules or not hasattr(modules[d], "p"):
                raise KeyError(f"HanPruner: expected a dropout module named {d!r}, found none")
            if layer not in self.layers:
                raise KeyError(
                    f"HanPruner: dropout {d!r} feeds {layer!r}; expected one of the pruned "
                    f"layers {list(self.layers)}"
                )
        self.original_dropout = {d: float(modules[d].p) for d in self.dropout_feeds}
        self._prepared = True
        return dict(self.original_connections)

    def prune(
        self,
        sparsity: float | dict | None = None,
        closure: Closure | None = None,
        *,
        quality: float | dict | None = None,
    ) -> dict[str, float]:
        """One round of Han pruning (see the class docstring for where the target comes from).

        Args:
            sparsity: target pruned fraction, a number or per layer.
            closure: unused (Han's rule needs no gradient); accepted for the common signature.
            quality: prune by Han's rule at this quality instead of a sparsity target.

        Returns:
            ``{layer name: kept fraction}`` after the round.
        """
        if quality is not None and sparsity is not None:
            raise ValueError("HanPruner.prune: expected sparsity or quality, got both")
        if not self._prepared:
            self.prepare()
        if quality is None and sparsity is None and self.schedule is None:
            if self.sparsity is None:
                quality = self.quality
            if quality is None and self.sparsity is None:
                raise ValueError(
                    "HanPruner.prune: expected a target (sparsity, quality or a schedule), got none"
                )
        if quality is not None:
            q = self._check_quality(quality, "prune(quality)")
            self._apply(self._masks_for_quality(q), quality=quality)
            return self.kept_fractions()
        return super().prune(sparsity, closure)

    @torch.no_grad()
    def compute_masks(self, sparsity, closure: Closure | None = None) -> dict[str, torch.Tensor]:
        """Per layer, the quality that keeps ``1 - sparsity`` of its weights, then Han's rule."""
        per = self._per_layer(sparsity)
        q = {
            n: None
            if per[n] is None
            else quality_for_density(m.weight, m.mask, 1.0 - per[n], name=n)
            for n, m in self.layers.items()
        }
        return self._masks_for_quality(q, per)

    def _masks_for_quality(
        self, qualities: dict[str, float | None], per: dict[str, float | None] | None = None
    ) -> dict[str, torch.Tensor]:
        masks, raised = {}, []
        for n, m in self.layers.items():
            if qualities[n] is None:
                continue
            mask = magnitude_mask(m.weight, m.mask, qualities[n], name=n)
            md = self.min_density
            if md is None:
                md = AUTO_MIN_DENSITY if per is None else auto_min_density(per[n])
            floor = floor_count(md, m.mask.numel())
            if int(mask.count_nonzero()) < floor <= int(m.mask.count_nonzero()):
                raised.append(n)
            mask = keep_at_least(m.weight, m.mask, mask, floor)
            masks[n] = mask
        if raised:
            warnings.warn(
                f"HanPruner: the round would keep fewer weights than the min_density floor in "
                f"{raised}; kept the floor's largest |w| (min_density=0: pure Han)",
                RuntimeWarning,
                stacklevel=3,
            )
        return masks

    def _after_masks(self, changed: bool) -> None:
        if self.dropout and self.dropout_feeds:
            apply_dropout_adjustment(
                self.model, self.dropout_feeds, self.original_dropout, self.original_connections
            )

    def freeze(self, kind: str) -> list[str]:
        """Freeze every conv (``kind="conv"``) or every FC (``kind="fc"``) layer of the model,
        sparse or dense: weight and bias get ``requires_grad = False`` and ``grad = None``, so
        backward computes no gradient for them and optimizers skip them (SGD, Adam, AdamW ignore
        a parameter whose ``grad`` is None, weight decay and momentum included).

        Han: retrain the FC layers with the conv layers frozen, and the reverse, to avoid
        vanishing gradients. Only Linear / Conv weights and biases are frozen; other parameters
        (e.g. BatchNorm's) keep training. Calling ``freeze`` again first undoes the previous
        ``freeze``, so ``freeze("conv")`` ... ``freeze("fc")`` switches.

        Returns:
            The names of the frozen layers.
        """
        if kind not in FREEZE_KINDS:
            raise ValueError(f"HanPruner.freeze: expected kind in {FREEZE_KINDS}, got {kind!r}")
        self.unfreeze()
        names = []
        for name, m in self.model.named_modules():
            if _conv_or_fc(m) != kind:
                continue
            names.append(name)
            for p in (m.weight, m.bias):
                if isinstance(p, nn.Parameter):
                    self._frozen.append((p, p.requires_grad))
                    p.requires_grad_(False)
                    p.grad = None
        self.frozen_kind = kind
        return names

    def unfreeze(self) -> None:
        """Undo :meth:`freeze`: every parameter gets back the ``requires_grad`` it had."""
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen = []
        self.frozen_kind = None

    @torch.no_grad()
    def finalize(self) -> dict:
        """Unfreeze everything and summarise (:meth:`BasePruner.finalize`), adding
        ``"original_connections"``, ``"compression"`` (original / kept connections) and
        ``"dropout"`` (``{name: p}``)."""
        self.unfreeze()
        out = super().finalize()
        orig = self.original_connections or dict(out["weights"])
        kept = sum(out["connections"].values())
        modules = dict(self.model.named_modules())
        out["original_connections"] = dict(orig)
        out["compression"] = sum(orig.values()) / kept if kept else math.inf
        out["dropout"] = {d: float(modules[d].p) for d in (self.dropout_feeds or {})}
        return out

    # ------------------------------------------------------------------ resume
    def _config(self) -> dict:
        return {
            "quality": self.quality,
            "dropout": self.dropout,
            "dropout_feeds": self.dropout_feeds if self._given_feeds else None,
            "min_density": self.min_density,
        }

    def _extra_state(self) -> dict:
        modules = dict(self.model.named_modules())
        return {
            "original_connections": dict(self.original_connections),
            "original_dropout": dict(self.original_dropout),
            "found_dropout_feeds": dict(self.dropout_feeds or {}),
            "prepared": self._prepared,
            # the dropout p the rule set (not in the model's state dict: p is no tensor)
            "dropout_p": {d: float(modules[d].p) for d in (self.dropout_feeds or {})},
        }

    def _load_extra_state(self, state: dict) -> None:
        self.original_connections = dict(state["original_connections"])
        self.original_dropout = dict(state["original_dropout"])
        self.dropout_feeds = dict(state["found_dropout_feeds"])
        self._prepared = bool(state["prepared"])
        modules = dict(self.model.named_modules())
        for d, p in state.get("dropout_p", {}).items():
            modules[d].p = p
