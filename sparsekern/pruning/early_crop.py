"""Early-CROP, early compression via gradient-flow preservation (Rachwan et al. 2022, "Winning the
Lottery Ahead of Time: Efficient Early Network Pruning").

Score (CroP, a GraSP variant): ``|theta * H g|``, ``g`` the gradient of the loss and ``H g`` the
Hessian-gradient product, by double backward: ``H g = d/dtheta (g(theta) . stopgrad(g))``. The
weights whose removal changes the gradient flow the least go; the top scores over all layers
together are kept.

When: early in training. At the end of every epoch the relative change of the weights since the
first epoch's end, ``r_e = ||theta_e - theta_1|| / ||theta_1||`` (all the model's parameters), is
measured; the first measured ``r`` times the target density sets the threshold, and pruning fires
at the first epoch whose ``|r_e - r_(e-1)|`` falls below it (the weights have entered the "lazy"
regime, the authors' reading), or at ``max_epoch`` at the latest. That is the authors' trainer;
the threshold's ``(1 - sparsity)`` factor is theirs (structured: ``min(1 - sparsity - 0.1,
0.99)``).

How: in several rounds at once, each re-scored, the sparsity rising towards the target by halving
the gap from ``lower`` (0.5 above a target of 0.5, else 0.25): ``limit - (limit - lower) 0.5^i``
for ``i = 0 .. rounds``, then the target (the authors' EarlyCroP, ``rounds = 100`` by default;
rounds whose kept count would not change are skipped). Then training goes on with fixed masks.

Structured variant (``structure="channel"``): the score of an output channel is the sum of its
weights' scores; whole channels are kept by the global top over channels, with at least one per
layer.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.pruning._common import auto_min_density, check_fraction
from sparsekern.pruning._latent import global_topk_masks
from sparsekern.pruning.base import BasePruner, Closure
from sparsekern.pruning.importance import Importance, check_finite, score_masks

__all__ = ["CroPImportance", "EarlyCROPPruner", "crop_scores", "hessian_gradient"]

STRUCTURES = ("unstructured", "channel")


def hessian_gradient(
    layers: dict[str, nn.Module], closure: Closure
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(g, H g)`` w.r.t. each layer's weight: ``g`` the gradient of ``closure()``'s loss, ``H g``
    its Hessian times ``g`` (the Hessian over all the layers' weights together), by double
    backward. ``.grad`` fields are not touched.

    Returns:
        ``({name: g}, {name: H g})``, each the weight's shape.
    """
    names = [n for n, m in layers.items() if m.weight.requires_grad]
    weights = [layers[n].weight for n in names]
    with torch.enable_grad():
        loss = closure()
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
            raise TypeError("hessian_gradient: expected the closure to return a 0-d loss tensor")
        g = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
        g = [torch.zeros_like(w) if x is None else x for x, w in zip(g, weights)]
        z = sum((x * x.detach()).sum() for x in g if x.requires_grad)
        if not isinstance(z, torch.Tensor):  # a loss linear in every weight: H g = 0
            hg = [torch.zeros_like(w) for w in weights]
        else:
            hg = torch.autograd.grad(z, weights, allow_unused=True)
            hg = [torch.zeros_like(w) if x is None else x for x, w in zip(hg, weights)]
    return (
        {n: x.detach() for n, x in zip(names, g)},
        {n: x.detach() for n, x in zip(names, hg)},
    )


def crop_scores(layers: dict[str, nn.Module], closure: Closure) -> dict[str, torch.Tensor]:
    """CroP's ``|theta * H g|`` per weight (the masks as they are: a pruned weight is 0 and
    scores 0)."""
    _, hg = hessian_gradient(layers, closure)
    return {n: (layers[n].weight.detach() * h).abs() for n, h in hg.items()}


class CroPImportance(Importance):
    """CroP's ``|theta * H g|`` as a pluggable :class:`~sparsekern.pruning.importance.Importance`
    (any ``ImportancePruner`` can prune by it)."""

    needs_closure = True

    def __call__(self, layers, closure=None):
        if closure is None:
            raise ValueError(
                "CroPImportance: expected a closure returning the loss on a batch (the score "
                "needs H g by double backward), got None"
            )
        scores = crop_scores(layers, closure)
        for n, sc in scores.items():
            check_finite(sc, n, "CroPImportance", "score")
        return scores


class EarlyCROPPruner(BasePruner):
    """Early-CROP: train dense until the relative weight change stabilises, then prune by
    ``|theta * H g|`` (global top) in a few re-scored rounds, and train on.

    Lifecycle::

        pruner = EarlyCROPPruner(model, opt, sparsity=0.95)
        for epoch in range(epochs):
            for x, y in loader:
                closure = lambda: F.cross_entropy(model(x), y)
                loss = closure(); opt.zero_grad(); loss.backward(); opt.step()
                pruner.step()
            pruner.epoch_end(closure)     # measures r_e; prunes when it stops changing

    Args:
        model, optimizer, base keywords (``layers``, ``regularization``, ``reg_strength``): see
            :class:`BasePruner`.
        sparsity: the target pruned fraction (all layers together).
        rounds: pruning rounds at the trigger (authors: 100; equal counts skipped).
        max_epoch: prune at this epoch's end at the latest (None: only when the trigger fires).
        structure: ``"unstructured"`` or ``"channel"`` (output channels).
        min_density: each layer's floor on its kept fraction (None: ``min(0.01, (1 - s) / 2)``).

    Attributes:
        importance: the :class:`CroPImportance` scoring each round.
        pruned_at_epoch: the epoch whose end pruned (None before). changes: the ``r_e`` measured.
        threshold: the trigger threshold (None until the first ``r`` is measured).
        scores: the last round's scores.
    """

    #: pruned weights never return (prune(s) below the sparsity reached is refused)
    monotone = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sparsity: float,
        rounds: int = 100,
        max_epoch: int | None = None,
        structure: str = "unstructured",
        min_density: float | None = None,
        **base,
    ) -> None:
        super().__init__(model, optimizer, sparsity=sparsity, **base)
        check_fraction(sparsity, "EarlyCROPPruner")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"EarlyCROPPruner: expected rounds an integer >= 0, got {rounds!r}")
        if structure not in STRUCTURES:
            raise ValueError(
                f"EarlyCROPPruner: expected structure in {STRUCTURES}, got {structure!r}"
            )
        if max_epoch is not None and max_epoch < 1:
            raise ValueError(f"EarlyCROPPruner: expected max_epoch >= 1, got {max_epoch}")
        self.rounds_at_trigger, self.max_epoch, self.structure = rounds, max_epoch, structure
        self.min_density = (
            None
            if min_density is None
            else check_fraction(min_density, "EarlyCROPPruner", "min_density")
        )
        self.epochs = 0
        self.reference: torch.Tensor | None = None  # theta_1, flat, float64 on CPU
        self.changes: list[float] = []
        self.threshold: float | None = None
        self.pruned_at_epoch: int | None = None
        self.scores: dict[str, torch.Tensor] | None = None
        self.importance = CroPImportance()

    # ------------------------------------------------------------------ when
    def _flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().double().cpu().flatten() for p in self.model.parameters()])

    def observe(self, flat: torch.Tensor) -> bool:
        """Record the end of an epoch with parameters ``flat``; True when the trigger fires (the
        authors' rule, module docstring)."""
        self.epochs += 1
        if self.reference is None:
            self.reference = flat.clone()
            return False
        r = float(torch.linalg.vector_norm(flat - self.reference)) / max(
            float(torch.linalg.vector_norm(self.reference)), 1e-30
        )
        prev = self.changes[-1] if self.changes else 0.0
        self.changes.append(r)
        if self.threshold is None:
            density = 1.0 - self.sparsity
            if self.structure == "channel":
                density = min(density - 0.1, 0.99)
            self.threshold = r * density
        return abs(r - prev) < self.threshold

    def epoch_end(self, closure: Closure | None = None) -> bool:
        """Call at the end of every epoch: measures ``r_e``; when the trigger fires (or at
        ``max_epoch``) prunes to the target with ``closure`` (the loss on a batch).

        Returns:
            True if it pruned now.
        """
        if self.pruned_at_epoch is not None:
            self.epochs += 1
            return False
        fire = self.observe(self._flat_params())
        if not fire and not (self.max_epoch is not None and self.epochs >= self.max_epoch):
            return False
        if closure is None:
            raise ValueError(
                "EarlyCROPPruner.epoch_end: the trigger fired and pruning needs H g; expected a "
                "closure returning the loss on a batch, got None"
            )
        self.prune(closure=closure)
        self.pruned_at_epoch = self.epochs
        return True

    # ------------------------------------------------------------------ how
    def round_targets(self, limit: float | None = None) -> list[float]:
        """The sparsities of the rounds: ``limit - (limit - lower) 0.5^i``, ``i = 0..rounds``,
        then ``limit``; ``lower`` 0.5 above a limit of 0.5, else 0.25 (the authors')."""
        limit = self.sparsity if limit is None else limit
        lower = 0.5 if limit > 0.5 else 0.25
        if limit <= lower:
            return [limit]
        return [limit - (limit - lower) * 0.5**i for i in range(self.rounds_at_trigger + 1)] + [
            limit
        ]

    @torch.no_grad()
    def _masks_from_scores(self, scores: dict, sparsity: float) -> dict:
        floor = auto_min_density(sparsity) if self.min_density is None else self.min_density
        if self.structure == "unstructured":
            return score_masks(self.layers, scores, sparsity, "global", self.min_density,
                               type(self).__name__)  # fmt: skip
        chan = {}
        for n, x in scores.items():
            rows = 1 if getattr(self.layers[n], "weight_layout", "out_in") == "in_out" else 0
            alive = self.layers[n].mask.sum(dim=[d for d in range(x.dim()) if d != rows]) > 0
            c = x.double().sum(dim=[d for d in range(x.dim()) if d != rows])
            chan[n] = c.masked_fill(~alive.cpu().to(c.device), -1.0)
        keep = global_topk_masks(chan, 1.0 - sparsity, max(floor, 1e-12))
        out = {}
        for n, k in keep.items():
            mod = self.layers[n]
            if getattr(mod, "weight_layout", "out_in") == "in_out":
                out[n] = k.view(1, -1).expand_as(mod.mask).contiguous() & mod.mask
            else:
                shape = [-1] + [1] * (mod.mask.dim() - 1)
                out[n] = k.view(shape).expand_as(mod.mask).contiguous() & mod.mask
        return out

    def compute_masks(self, sparsity: float, closure: Closure | None = None) -> dict:
        """One round: score ``|theta * H g|`` with ``closure`` and keep the global top
        ``1 - sparsity`` (of weights, or of channels)."""
        if closure is None:
            raise ValueError(
                "EarlyCROPPruner: expected a closure returning the loss on a batch (the score "
                "needs H g by double backward), got None"
            )
        self.scores = self.importance(self.layers, closure)
        return self._masks_from_scores(self.scores, sparsity)

    def prune(self, sparsity=None, closure: Closure | None = None) -> dict:
        """Prune to ``sparsity`` (default: the target) in :meth:`round_targets`' rounds, each
        re-scored with ``closure``."""
        limit = self.sparsity if sparsity is None else self._check_target(sparsity, "prune")
        total = sum(m.mask.numel() for m in self.layers.values())
        last_kept = None
        for s in self.round_targets(limit):
            kept_now = sum(int(m.mask.count_nonzero()) for m in self.layers.values())
            kept = round((1.0 - s) * total)
            if s != limit and (kept >= kept_now or kept == last_kept):
                continue  # a round that would not prune: skip the double backward
            last_kept = kept
            self._apply(self.compute_masks(s, closure), target=s)
        return self.kept_fractions()

    # ------------------------------------------------------------------ resume
    def _config(self) -> dict:
        return {
            "rounds": self.rounds_at_trigger,
            "max_epoch": self.max_epoch,
            "structure": self.structure,
            "min_density": self.min_density,
        }

    def _extra_state(self) -> dict:
        return {
            "epochs": self.epochs,
            "reference": None if self.reference is None else self.reference.clone(),
            "changes": list(self.changes),
            "threshold": self.threshold,
            "pruned_at_epoch": self.pruned_at_epoch,
        }

    def _load_extra_state(self, state: dict) -> None:
        self.epochs = int(state["epochs"])
        ref = state["reference"]
        self.reference = None if ref is None else ref.clone()
        self.changes = [float(c) for c in state["changes"]]
        self.threshold = state["threshold"]
        self.pruned_at_epoch = state["pruned_at_epoch"]
