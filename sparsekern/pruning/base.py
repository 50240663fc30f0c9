"""``BasePruner``: the one lifecycle every pruning method of sparsekern derives from.

A pruner owns the masks of a model's sparse layers (``SparseLinear`` / ``SparseConv2d``, see
``sparsekern.sparsify``) and changes them only through ``sparsekern.nn.set_mask``, which zeroes
the pruned weights and their optimizer state (momentum, Adam moments). Driving any pruner::

    model = sparsify(MyNet())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = SomePruner(model, opt, sparsity=0.9)        # or schedule=Cubic(...) / Geometric(...)
    for x, y in loader:
        closure = lambda: F.cross_entropy(model(x), y)     # only the methods that need it call it
        loss = closure() + pruner.regularization_loss()    # zero unless the method regularises
        opt.zero_grad(); loss.backward(); opt.step()
        changed = pruner.step(closure)                     # True when a mask changed
    kept = pruner.prune()                                  # or prune explicitly, any time
    summary = pruner.finalize()
    ckpt = {"pruner": pruner.state_dict(), ...}            # resume: load_state_dict(ckpt["pruner"])

The target is always a **sparsity**: the pruned fraction, in [0, 1] (a number, or a dict by
layer name / ``"conv"`` / ``"fc"`` / ``"*"`` for the pruners with per-layer targets). It comes
from, in this order: the ``sparsity`` argument of :meth:`BasePruner.prune`; the schedule
(:mod:`sparsekern.pruning.schedules`) at the pruner's clock; the constructor's ``sparsity``.

Subclasses implement :meth:`BasePruner.compute_masks` (target -> new masks, without touching the
model), take their own keywords and forward the shared ones (``sparsity``, ``schedule``,
``layers``, ``regularization``, ``reg_strength``) with ``**base``::

    class MyPruner(BasePruner):
        def __init__(self, model, optimizer=None, *, my_knob=1.0, **base):
            super().__init__(model, optimizer, **base)

and may override :meth:`BasePruner.step`, :meth:`BasePruner.regularization_loss` and the
``_config`` / ``_extra_state`` hooks that feed ``state_dict``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from sparsekern.nn.masks import set_mask, zero_optimizer_state
from sparsekern.pruning._layers import require_sparse_layers, resolve_per_layer, sparse_layers
from sparsekern.pruning._optim import ELEMENTWISE, check_elementwise, optimizers_holding
from sparsekern.pruning._sharded import wrap_sharded
from sparsekern.pruning._vocab import wrap_init
from sparsekern.pruning.regularization import REGULARIZATIONS, regularization_loss
from sparsekern.pruning.schedules import Schedule

__all__ = ["BasePruner", "Closure"]

Closure = Callable[[], torch.Tensor]  # runs the model on the current batch, returns a 0-d loss


class BasePruner:
    """The pruner lifecycle: construct, ``step()`` after every optimizer step, ``prune()``,
    ``regularization_loss()``, ``finalize()``, ``state_dict()`` / ``load_state_dict()``.

    Args:
        model: a model with sparse layers (``sparsekern.sparsify(model)``).
        optimizer: the optimizer training the model, or None; its state is zeroed wherever a
            mask changes. Replace it with :meth:`set_optimizer` (e.g. a fresh optimizer for
            retraining). Its update must be elementwise (SGD, Adam, AdamW, ...: LBFGS and Muon
            are refused, since they move pruned weights off zero). Any other optimizer seen
            stepping that holds state for the pruned weights is zeroed too, with a warning
            (without that, momentum revives pruned weights).
        sparsity: the target pruned fraction (see the module docstring); None if the pruner
            takes its target from ``schedule`` or from each ``prune(sparsity)`` call.
        schedule: a :class:`~sparsekern.pruning.schedules.Schedule`. Step clock: ``step()``
            prunes at its update steps. Round clock: ``prune()`` without a target prunes to the
            schedule's target of the next round.
        layers: restrict pruning to these sparse-layer names (default: all of them).
        regularization: ``"none"`` (default), ``"l2"`` or ``"l1"``: what
            :meth:`regularization_loss` returns, over the trainable pruned layers' weights.
        reg_strength: its coefficient, Caffe's weight-decay scaling (L2: ``s/2 sum w^2``).

    Attributes:
        layers: ``{name: sparse module}`` the pruner owns.
        steps: optimizer steps counted by :meth:`step`.
        rounds: mask updates made so far (``prune()`` calls and scheduled prunes).
        history: one record per mask update: ``{"step", "round", "sparsity", "kept", ...}``.
    """

    #: whether the target may be a dict per layer
    per_layer_targets = False
    #: whether masks only shrink (a pruned weight never returns): then an explicit
    #: ``prune(sparsity)`` below the sparsity reached is refused instead of doing nothing
    monotone = False

    def __init_subclass__(cls, **kwargs) -> None:
        # one deprecation path for every pruner: the old keyword names (blocksize, n / m,
        # global_pruning, seed) become the new ones with a DeprecationWarning (_vocab.RENAMED)
        super().__init_subclass__(**kwargs)
        wrap_init(cls)
        wrap_sharded(cls)  # FSDP2: mask decisions on gathered weights (pruning/_sharded.py)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sparsity: float | dict | None = None,
        schedule: Schedule | None = None,
        layers: Iterable[str] | None = None,
        regularization: str = "none",
        reg_strength: float = 0.0,
    ) -> None:
        who = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{who}: expected an nn.Module, got {type(model).__name__}")
        self.model = model
        if layers is None:
            self.layers = require_sparse_layers(model, who)
        else:
            self.layers = sparse_layers(model, layers)
            if not self.layers:
                raise ValueError(f"{who}: expected at least one sparse layer, got none")
        if sparsity is not None and schedule is not None:
            raise ValueError(f"{who}: expected sparsity or schedule, got both")
        self.sparsity = None if sparsity is None else self._check_target(sparsity, "sparsity")
        if schedule is not None:
            if not isinstance(schedule, Schedule):
                raise TypeError(
                    f"{who}: expected a sparsekern.pruning.schedules.Schedule, got "
                    f"{type(schedule).__name__}"
                )
            self._check_target(schedule.final, "schedule")
        self.schedule = schedule
        if regularization not in REGULARIZATIONS:
            raise ValueError(
                f"{who}: expected regularization in {REGULARIZATIONS}, got {regularization!r}"
            )
        if not (reg_strength >= 0 and math.isfinite(reg_strength)):
            raise ValueError(f"{who}: expected reg_strength >= 0, got {reg_strength}")
        self.regularization = regularization
        self.reg_strength = float(reg_strength)
        self.optimizer: torch.optim.Optimizer | None = None
        self.set_optimizer(optimizer)
        self._warned_optimizers: set[int] = set()
        if optimizer is None:
            # dense steps before the pruner was built: momentum / Adam moments of the weights
            # live in an optimizer the pruner was not given; find it now (also a gc scan when
            # the weights have gradients and no tracked optimizer matched)
            weights = [m.weight for m in self.layers.values()]
            self._other_optimizers(scan=any(w.grad is not None for w in weights))
        self.steps = 0
        self.rounds = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ the lifecycle
    def step(self, closure: Closure | None = None) -> bool:
        """Call after every ``optimizer.step()``. Counts the step; with a step-clock schedule,
        prunes on its update steps.

        Args:
            closure: no-argument callable that runs the model on the current batch and returns
                the loss. Only methods that need a fresh gradient call it (RigL on update steps,
                SNIP if scheduled); passing it always is cheap.

        Returns:
            True if any mask changed.
        """
        self.steps += 1
        s = self.schedule
        if s is None or s.clock != "step" or not s.is_update(self.steps):
            return False
        target = self._check_target(s(self.steps), "schedule")
        return self._apply(self.compute_masks(target, closure), target=target)

    def prune(self, sparsity: float | dict | None = None, closure: Closure | None = None) -> dict:
        """Prune now, to ``sparsity`` (default: the schedule's or the constructor's target).

        Every mask is computed before any is installed, so an error leaves the model, the
        optimizer and the pruner as they were.

        Returns:
            ``{layer name: kept fraction of its weights}`` after pruning.
        """
        target = (
            self._default_target()
            if sparsity is None
            else self._check_target(sparsity, "prune(sparsity)")
        )
        if sparsity is not None and self.monotone:
            self._check_reachable(target)
        self._apply(self.compute_masks(target, closure), target=target)
        return self.kept_fractions()

    def _check_reachable(self, target) -> None:
        """ValueError when an explicit target is below the sparsity already reached: pruned
        weights never return in this pruner, so the call would silently change nothing."""
        who = f"{type(self).__name__}.prune"
        if isinstance(target, dict) or getattr(self, "scope", "layer") == "layer":
            per = self._per_layer(target)
            low = {
                n: (round(1 - self.kept_fractions()[n], 4), s)
                for n, s in per.items()
                if s is not None
                and int(self.layers[n].mask.count_nonzero())
                < round((1 - s) * self.layers[n].mask.numel())
            }
            if low:
                raise ValueError(
                    f"{who}: expected a sparsity at least the one already reached (pruned "
                    "weights never return here), got (reached, asked) "
                    + ", ".join(f"{n}: {a}" for n, a in low.items())
                )
            return
        total = sum(m.mask.numel() for m in self.layers.values())
        kept = sum(int(m.mask.count_nonzero()) for m in self.layers.values())
        if kept < round((1 - target) * total):
            raise ValueError(
                f"{who}: expected a sparsity >= {self.current_sparsity():.4g}, the one already "
                f"reached (pruned weights never return here), got {target}"
            )

    def compute_masks(self, sparsity, closure: Closure | None = None) -> dict[str, torch.Tensor]:
        """The new masks for target ``sparsity``: ``{layer name: bool tensor of its weight's
        shape}`` for the layers that change; must not modify the model. Subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement compute_masks")

    def regularization_loss(self) -> torch.Tensor:
        """The penalty to add to the task loss: L1/L2 over the weights of the pruned layers that
        are not frozen (``regularization`` and ``reg_strength``); a 0-d zero tensor by default."""
        trainable = [m for m in self.layers.values() if m.weight.requires_grad]
        if not trainable or self.regularization == "none" or self.reg_strength == 0:
            w = next(iter(self.layers.values())).weight
            return w.new_zeros(())
        return regularization_loss(trainable, self.regularization, self.reg_strength)

    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Use ``optimizer`` from now on (e.g. a fresh one for retraining); it must hold every
        pruned layer's weight, so that their state is zeroed when masks change."""
        if optimizer is None:
            self.optimizer = None
            return
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{type(self).__name__}: expected a torch.optim.Optimizer or None, got "
                f"{type(optimizer).__name__}"
            )
        check_elementwise(optimizer, type(self).__name__)
        if not isinstance(optimizer, ELEMENTWISE):
            warnings.warn(
                f"{type(self).__name__}: cannot tell whether {type(optimizer).__name__}'s update "
                "is elementwise; pruned weights stay zero only under an elementwise optimizer "
                "(docs/pruning.md, 'Optimizers'); sparsekern.check_masks(model) after a step "
                "tells",
                RuntimeWarning,
                stacklevel=3,
            )
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, m in self.layers.items() if id(m.weight) not in held]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: expected an optimizer over every pruned layer's weight, "
                f"got one without {missing}"
            )
        self.optimizer = optimizer

    @torch.no_grad()
    def finalize(self) -> dict:
        """End of pruning: re-zero any pruned weight that is not exactly zero (none should be)
        and summarise.

        Returns:
            ``{"kept": {layer: fraction}, "connections": {layer: kept count}, "weights":
            {layer: numel}, "total_kept": fraction, "sparsity": pruned fraction, "steps",
            "rounds", "history"}``.
        """
        for m in self.layers.values():
            m.weight.masked_fill_(~m.mask, 0)
        conn = {n: int(m.mask.count_nonzero()) for n, m in self.layers.items()}
        sizes = {n: m.mask.numel() for n, m in self.layers.items()}
        total_kept = sum(conn.values()) / sum(sizes.values())
        return {
            "kept": self.kept_fractions(),
            "connections": conn,
            "weights": sizes,
            "total_kept": total_kept,
            "sparsity": 1.0 - total_kept,
            "steps": self.steps,
            "rounds": self.rounds,
            "history": [dict(h) for h in self.history],
        }

    # ------------------------------------------------------------------ resume
    def config(self) -> dict:
        """The hyperparameters (JSON-able): what :meth:`load_state_dict` compares."""
        return {
            "layers": list(self.layers),
            "sparsity": self.sparsity,
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "regularization": self.regularization,
            "reg_strength": self.reg_strength,
            **self._config(),
        }

    def state_dict(self) -> dict:
        """The pruner's state, to resume a run (the masks themselves are buffers in the model's
        state dict). Plain Python values and tensors: ``torch.save`` / ``torch.load(...,
        weights_only=True)`` keep it."""
        return {
            "pruner": type(self).__name__,
            "config": self.config(),
            "steps": self.steps,
            "rounds": self.rounds,
            "history": [dict(h) for h in self.history],
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore :meth:`state_dict`'s output. Refuses (``ValueError``, naming each difference)
        a state from another pruner class, or, with ``strict``, from a pruner configured
        differently (another sparsity, schedule, layer set, ...): resuming with changed
        hyperparameters would silently give a run that no single command reproduces. Nothing is
        changed when it refuses."""
        who = type(self).__name__
        if not isinstance(state, dict) or "pruner" not in state:
            raise ValueError(f"{who}.load_state_dict: expected a pruner state_dict, got {state!r}")
        if state["pruner"] != who:
            raise ValueError(
                f"{who}.load_state_dict: expected the state of a {who}, got a {state['pruner']}"
            )
        for key in ("steps", "rounds"):
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(
                    f"{who}.load_state_dict: expected {key!r} an integer >= 0, got {v!r}"
                )
        hist = state.get("history")
        if not isinstance(hist, list) or not all(isinstance(h, dict) for h in hist):
            raise ValueError(f"{who}.load_state_dict: expected 'history' a list of dicts")
        if not isinstance(state.get("config"), dict):
            raise ValueError(f"{who}.load_state_dict: expected 'config' a dict")
        if strict:
            saved = {_RENAMED_CONFIG.get(k, k): v for k, v in state["config"].items()}
            diffs = config_differences(saved, self.config())
            if diffs:
                raise ValueError(
                    f"{who}.load_state_dict: the state was saved with another configuration: "
                    + "; ".join(diffs)
                )
        self.steps = int(state["steps"])
        self.rounds = int(state["rounds"])
        self.history = [dict(h) for h in state["history"]]
        self._load_extra_state(state)

    def _config(self) -> dict:
        return {}

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ measures
    def kept_fractions(self) -> dict[str, float]:
        """``{layer name: mask.sum() / mask.numel()}`` now."""
        return {n: int(m.mask.count_nonzero()) / m.mask.numel() for n, m in self.layers.items()}

    def current_sparsity(self) -> float:
        """Pruned fraction of all the pruned layers' weights together, now."""
        kept = sum(int(m.mask.count_nonzero()) for m in self.layers.values())
        return 1.0 - kept / sum(m.mask.numel() for m in self.layers.values())

    def __repr__(self) -> str:
        cfg = {k: v for k, v in self.config().items() if k != "layers" and v is not None}
        return f"{type(self).__name__}({len(self.layers)} layers, {cfg})"

    # ------------------------------------------------------------------ helpers
    def _default_target(self):
        s = self.schedule
        if s is not None:
            t = self.rounds + 1 if s.clock == "round" else self.steps
            return self._check_target(s(t), "schedule")
        if self.sparsity is not None:
            return self.sparsity
        raise ValueError(
            f"{type(self).__name__}.prune: expected a target sparsity (prune(sparsity), the "
            f"constructor's sparsity or a schedule), got none"
        )

    def _check_target(self, value, what: str):
        """A sparsity in [0, 1], or (``per_layer_targets``) a dict whose keys are layer names,
        kinds or ``"*"``; raises naming what was expected."""
        who = f"{type(self).__name__}: {what}"
        if isinstance(value, dict):
            if not self.per_layer_targets:
                raise TypeError(f"{who}: expected one sparsity for all layers, got a dict")
            resolved = resolve_per_layer(self.layers, value, who)  # unknown keys: KeyError
            for n, v in resolved.items():
                if v is not None and not 0.0 <= v <= 1.0:
                    raise ValueError(f"{who}: expected sparsities in [0, 1], got {n}={v}")
            return dict(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{who}: expected a sparsity in [0, 1], got {value!r}")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{who}: expected a sparsity in [0, 1], got {value}")
        return float(value)

    def _per_layer(self, sparsity) -> dict[str, float | None]:
        """``{layer: sparsity or None}`` (None: the target leaves the layer alone)."""
        return resolve_per_layer(self.layers, sparsity, f"{type(self).__name__}: sparsity")

    @torch.no_grad()
    def _apply(self, masks: dict[str, torch.Tensor], **record) -> bool:
        """Install ``masks`` (all checked first), count the round, run :meth:`_after_masks`,
        record it in ``history``; returns whether any mask changed."""
        for n, mask in masks.items():
            if n not in self.layers:
                raise KeyError(f"{type(self).__name__}: mask for unknown layer {n!r}")
            m = self.layers[n]
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"{type(self).__name__}: expected a bool mask for {n}")
            if mask.shape != m.mask.shape:
                raise ValueError(
                    f"{type(self).__name__}: expected a mask of shape {list(m.mask.shape)} for "
                    f"{n}, got {list(mask.shape)}"
                )
        others = self._other_optimizers()
        changed = False
        for n, mask in masks.items():
            m = self.layers[n]
            mask = mask.to(m.mask.device)
            if torch.equal(mask, m.mask):
                continue
            reset = ~mask | (mask != m.mask)
            set_mask(m, mask, self.optimizer)
            for opt in others:
                zero_optimizer_state(opt, m.weight, reset)
            changed = True
        self.rounds += 1
        self._after_masks(changed)
        self.history.append(
            {
                "step": self.steps,
                "round": self.rounds,
                **{k: _jsonable(v) for k, v in record.items()},
                "sparsity": self.current_sparsity(),
                "kept": self.kept_fractions(),
                "changed": changed,
            }
        )
        return changed

    def _other_optimizers(self, scan: bool = False) -> list:
        """The optimizers other than :attr:`optimizer` holding state for the pruned weights
        (:mod:`sparsekern.pruning._optim`): their state is zeroed with the given one's. Raises
        for one whose update is not elementwise; warns once per optimizer found."""
        weights = [m.weight for m in self.layers.values()]
        others = [o for o in optimizers_holding(weights, scan) if o is not self.optimizer]
        who = type(self).__name__
        for o in others:
            check_elementwise(o, who)
            if id(o) not in self._warned_optimizers:
                self._warned_optimizers.add(id(o))
                warnings.warn(
                    f"{who}: a {type(o).__name__} that was not passed to the pruner holds state "
                    "(momentum, moments) for the pruned weights; it is zeroed wherever a mask "
                    "changes, or the next steps would revive pruned weights. Pass it: "
                    f"{who}(model, optimizer, ...) or set_optimizer(optimizer)",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return others

    def _after_masks(self, changed: bool) -> None:
        """Hook after masks were installed (Han: the dropout adjustment)."""


wrap_sharded(BasePruner)

#: config keys of earlier releases -> now (a state saved before the vocabulary still resumes)
_RENAMED_CONFIG = {"blocksize": "block_size"}


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def config_differences(saved: dict, now: dict) -> list[str]:
    """``["key: saved X, now Y", ...]`` for the keys whose values differ (floats compared
    exactly: a resumed run must be the same run)."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: saved {a!r}, now {b!r}")
    return out
