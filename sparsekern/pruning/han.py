"""``HanPruner``: Han et al. 2015's train -> prune -> retrain method as a lifecycle object that any
training loop can drive (see the package docstring for an example)."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsekern.nn.masks import set_mask
from sparsekern.pruning._layers import layer_kind, require_sparse_layers, resolve_per_layer
from sparsekern.pruning.dropout import apply_dropout_adjustment, find_dropout_feeds
from sparsekern.pruning.magnitude import keep_at_least, magnitude_mask, quality_for_density
from sparsekern.pruning.regularization import REGULARIZATIONS, regularization_loss

__all__ = ["HanPruner", "density_schedule", "FREEZE_KINDS"]

FREEZE_KINDS = ("conv", "fc")


def density_schedule(final_density: float | dict[str, float], rounds: int) -> list:
    """Per-round target densities for iterative pruning, geometric so that every round removes
    the same fraction of what is left: round ``k`` (1-based) keeps ``final ** (k / rounds)``.

    E.g. ``density_schedule(0.08, 3)`` -> ``[0.431, 0.186, 0.08]``. A dict (layer name / kind /
    ``"*"`` -> final density) gives a list of dicts. Pass each entry to ``HanPruner.prune(
    density=...)``.
    """
    if rounds < 1:
        raise ValueError(f"density_schedule: expected rounds >= 1, got {rounds}")

    def one(d: float) -> list[float]:
        if not 0.0 < d <= 1.0:
            raise ValueError(f"density_schedule: expected a final density in (0, 1], got {d}")
        return [d ** (k / rounds) for k in range(1, rounds + 1)]

    if isinstance(final_density, dict):
        per = {k: one(v) for k, v in final_density.items()}
        return [{k: v[r] for k, v in per.items()} for r in range(rounds)]
    return one(float(final_density))


def _conv_or_fc(m: nn.Module) -> str | None:
    if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
        return layer_kind(m)
    return None


class HanPruner:
    """Han et al.'s pruning method, one call per phase.

    Lifecycle::

        pruner = HanPruner(model, quality={"conv": 0.5, "fc": 1.0}, optimizer=opt)
        pruner.prepare()            # after dense training: record C_io, dropout p, ...
        kept = pruner.prune()       # one round: every sparse layer by its own quality
        ... retrain: loss = task_loss + pruner.regularization_loss(); opt.step(); pruner.step()
        kept = pruner.prune()       # next round (iterative pruning), retrain again, ...
        summary = pruner.finalize()

    Args:
        model: a model whose Linear/Conv layers are sparse (``sparsekern.sparsify(model)``).
        quality: the quality parameter (threshold = quality x std of the layer's surviving
            weights): one number, or a dict by layer name, then kind (``"conv"``/``"fc"``), then
            ``"*"``; layers it does not cover are never pruned. Typical values come from
            :func:`sparsekern.pruning.sensitivity_analysis` / ``choose_qualities``.
        optimizer: the optimizer used for retraining. Its state (momentum, Adam moments) is zeroed
            at pruned entries on every ``prune()``. Pass it whenever there is one.
        regularization: ``"l2"`` (Han: best after retraining), ``"l1"`` or ``"none"``: the kind of
            :meth:`regularization_loss`.
        reg_strength: its coefficient, Caffe's weight decay (5e-4 is Caffe's LeNet/AlexNet value).
            Do not also set the optimizer's ``weight_decay``.
        dropout: adjust the dropout modules feeding each pruned layer after every ``prune()``:
            ``p = p_o * sqrt(C_r / C_o)``.
        schedule: optional per-round qualities for iterative pruning: ``prune()`` number ``k``
            (0-based) uses ``schedule[k]`` (a number or a dict like ``quality``), the last entry
            once the list runs out. Because the threshold follows the survivors' std, even a
            constant schedule prunes further every round; sparsity never decreases (a pruned
            weight never returns).
        dropout_feeds: ``{dropout module name: layer name}``; default: found by tracing the model
            (:func:`sparsekern.pruning.find_dropout_feeds`).
        enforce_masks: make :meth:`step` re-zero pruned weights (a guard for optimizers that
            might move them; the built-in ones do not once ``set_mask`` ran).
        min_density: a floor on each layer's kept fraction (not in Han; a guard against a round
            emptying a layer, see :mod:`sparsekern.pruning.magnitude` on how fast a constant
            quality compounds): a round that would go below keeps the largest-magnitude
            ``ceil(min_density * numel)`` survivors instead. Default 0: pure Han.

    Attributes:
        round: number of ``prune()`` calls so far.
        history: per round, ``{layer: kept fraction}``.
        original_connections: ``{layer: C_io}``, kept connections at ``prepare()``.
        original_dropout: ``{dropout name: p}`` at ``prepare()``.
    """

    def __init__(
        self,
        model: nn.Module,
        quality: float | dict[str, float] = 1.0,
        optimizer: torch.optim.Optimizer | None = None,
        regularization: str = "l2",
        reg_strength: float = 5e-4,
        dropout: bool = True,
        schedule: list | None = None,
        dropout_feeds: dict[str, str] | None = None,
        enforce_masks: bool = False,
        min_density: float = 0.0,
    ) -> None:
        self.model = model
        self.layers = require_sparse_layers(model, "HanPruner")
        if regularization not in REGULARIZATIONS:
            raise ValueError(
                f"HanPruner: expected regularization in {REGULARIZATIONS}, got {regularization!r}"
            )
        if reg_strength < 0:
            raise ValueError(f"HanPruner: expected reg_strength >= 0, got {reg_strength}")
        # Validate every quality now: a typo in a layer name should fail before training starts.
        resolve_per_layer(self.layers, quality, "HanPruner: quality")
        for i, q in enumerate(schedule or []):
            resolve_per_layer(self.layers, q, f"HanPruner: schedule[{i}]")
        self.quality = quality
        self.optimizer = optimizer
        self.regularization = regularization
        self.reg_strength = reg_strength
        self.dropout = dropout
        self.schedule = list(schedule) if schedule is not None else None
        self.dropout_feeds = dict(dropout_feeds) if dropout_feeds is not None else None
        self.enforce_masks = enforce_masks
        if not 0.0 <= min_density <= 1.0:
            raise ValueError(f"HanPruner: expected min_density in [0, 1], got {min_density}")
        self.min_density = min_density
        self.round = 0
        self.steps = 0
        self.history: list[dict[str, float]] = []
        self.original_connections: dict[str, int] = {}
        self.original_dropout: dict[str, float] = {}
        self._prepared = False
        self._frozen: list[tuple[torch.nn.Parameter, bool]] = []
        self.frozen_kind: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def prepare(self) -> dict[str, int]:
        """Record what pruning is measured against; call after dense training, before ``prune()``
        (``prune()`` calls it if needed). Calling it again re-bases ``C_io`` and dropout ``p`` on
        the model as it is now.

        Records the kept connections of each sparse layer (``C_io``) and the ``p`` of each
        dropout module feeding one (found by tracing unless given).

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
                    f"HanPruner: dropout {d!r} feeds {layer!r}; expected one of the sparse layers "
                    f"{list(self.layers)}"
                )
        self.original_dropout = {d: float(modules[d].p) for d in self.dropout_feeds}
        self._prepared = True
        return dict(self.original_connections)

    def _round_quality(self):
        if self.schedule:
            return self.schedule[min(self.round, len(self.schedule) - 1)]
        return self.quality

    @torch.no_grad()
    def prune(
        self,
        quality: float | dict[str, float] | None = None,
        density: float | dict[str, float] | None = None,
    ) -> dict[str, float]:
        """One pruning round: every covered sparse layer gets
        ``mask &= |w| > quality_layer * std(surviving w)`` through ``set_mask`` (pruned weights
        and their optimizer state zeroed, survivors untouched); then the dropout modules are
        adjusted.

        Args:
            quality: override this round's quality (number or dict as in the constructor).
            density: instead of a quality, a target kept fraction per layer (number or dict);
                the quality that reaches it is computed per layer (:func:`quality_for_density`).

        Returns:
            ``{layer name: kept fraction of its weights}`` after this round, for every sparse
            layer.
        """
        if quality is not None and density is not None:
            raise ValueError("HanPruner.prune: expected quality or density, got both")
        if not self._prepared:
            self.prepare()
        if density is not None:
            dens = resolve_per_layer(self.layers, density, "HanPruner.prune: density")
            qualities = {
                n: None if dens[n] is None else quality_for_density(m.weight, m.mask, dens[n])
                for n, m in self.layers.items()
            }
        else:
            q = quality if quality is not None else self._round_quality()
            qualities = resolve_per_layer(self.layers, q, "HanPruner.prune: quality")
        # All masks first, then install: a failure leaves the model as it was.
        masks = {}
        for n, m in self.layers.items():
            if qualities[n] is None:
                continue
            mask = magnitude_mask(m.weight, m.mask, qualities[n])
            if self.min_density > 0:
                floor = math.ceil(self.min_density * m.mask.numel())
                mask = keep_at_least(m.weight, m.mask, mask, floor)
            masks[n] = mask
        for n, mask in masks.items():
            set_mask(self.layers[n], mask, self.optimizer)
        if self.dropout and self.dropout_feeds:
            apply_dropout_adjustment(
                self.model, self.dropout_feeds, self.original_dropout, self.original_connections
            )
        kept = self.kept_fractions()
        self.history.append(kept)
        self.round += 1
        return kept

    def regularization_loss(self) -> torch.Tensor:
        """The L1/L2 penalty (constructor's ``regularization`` and ``reg_strength``) over the
        weights of the sparse layers that are not frozen; add it to the task loss. A 0-d tensor.
        """
        trainable = [m for m in self.layers.values() if m.weight.requires_grad]
        if not trainable:
            return next(iter(self.layers.values())).weight.new_zeros(())
        return regularization_loss(trainable, self.regularization, self.reg_strength)

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
    def step(self) -> None:
        """Per-optimizer-step hook: counts steps; with ``enforce_masks`` re-zeroes pruned weights.
        Optional: with set_mask and the masked kernels, pruned weights stay zero on their own."""
        self.steps += 1
        if self.enforce_masks:
            for m in self.layers.values():
                m.weight.masked_fill_(~m.mask, 0)

    @torch.no_grad()
    def finalize(self) -> dict:
        """End of pruning: unfreeze everything, check that every pruned weight is exactly zero
        (zeroing any stray one) and return a summary.

        Returns:
            ``{"rounds": int, "kept": {layer: fraction}, "connections": {layer: kept count},
            "original_connections": {layer: count}, "total_kept": fraction of all sparse-layer
            weights, "compression": original / kept connections, "dropout": {name: p}}``.
        """
        self.unfreeze()
        for m in self.layers.values():
            m.weight.masked_fill_(~m.mask, 0)
        conn = {n: int(m.mask.count_nonzero()) for n, m in self.layers.items()}
        total = sum(m.mask.numel() for m in self.layers.values())
        orig = self.original_connections or {n: m.mask.numel() for n, m in self.layers.items()}
        kept_total = sum(conn.values())
        modules = dict(self.model.named_modules())
        return {
            "rounds": self.round,
            "kept": self.kept_fractions(),
            "connections": conn,
            "original_connections": dict(orig),
            "total_kept": kept_total / total,
            "compression": sum(orig.values()) / kept_total if kept_total else math.inf,
            "dropout": {d: float(modules[d].p) for d in (self.dropout_feeds or {})},
        }

    # ------------------------------------------------------------------ helpers
    def kept_fractions(self) -> dict[str, float]:
        """``{layer name: mask.sum() / mask.numel()}`` now."""
        return {n: int(m.mask.count_nonzero()) / m.mask.numel() for n, m in self.layers.items()}

    def state_dict(self) -> dict:
        """The pruner's own state (the masks live in the model's state dict), to resume a run."""
        return {
            "round": self.round,
            "steps": self.steps,
            "history": [dict(h) for h in self.history],
            "original_connections": dict(self.original_connections),
            "original_dropout": dict(self.original_dropout),
            "dropout_feeds": dict(self.dropout_feeds or {}),
            "prepared": self._prepared,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.round = int(state["round"])
        self.steps = int(state["steps"])
        self.history = [dict(h) for h in state["history"]]
        self.original_connections = dict(state["original_connections"])
        self.original_dropout = dict(state["original_dropout"])
        self.dropout_feeds = dict(state["dropout_feeds"])
        self._prepared = bool(state["prepared"])
