"""Multi-task pruning of one shared encoder under a fixed parameter budget (the seed's abstract on
pruning a pretrained language model for several tasks at once): the encoder is pruned once, by the
importance of its weights to the *weighted multi-task loss* ``sum_t w_t L_t``, instead of once per
task; the heads stay per task.

Two variants:

- element-wise (``mode="element"``): one score per weight, ``|w * dL/dw|`` (first-order Taylor)
  or ``|w|``, ranked over all encoder layers together; exactly ``budget`` weights stay;
- rank-wise (``mode="rank"``): each linear layer ``W [out, in]`` becomes low-rank factors
  ``A [out, r] @ B [r, in]`` (:class:`LowRankLinear`) from its SVD ``W = sum_i s_i u_i v_i^T``;
  component ``i`` scores ``|s_i u_i^T G v_i|`` (the first-order change of the multi-task loss
  when it is removed, ``G = dL/dW``) or ``s_i``, and components are kept greedily by score per
  parameter (``in + out`` each) while they fit the budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sparsekern.pruning._common import dense_weight_grads
from sparsekern.pruning.importance import (
    Importance,
    ImportancePruner,
    MagnitudeImportance,
    TaylorImportance,
)

__all__ = ["LowRankLinear", "MultiTaskImportance", "MultiTaskPruner"]

CRITERIA = ("taylor", "magnitude")
MODES = ("element", "rank")


class MultiTaskImportance(Importance):
    """Scores from the weighted multi-task loss: the closure returns ``{task: 0-d loss}`` and the
    loss is ``sum_t task_weights[t] * loss[t]`` (weights default 1). ``criterion="taylor"``:
    ``|w * dL/dw|`` with the dense gradient (:class:`TaylorImportance`); ``"magnitude"``: ``|w|``
    (no closure needed)."""

    def __init__(self, task_weights: dict[str, float] | None = None, criterion: str = "taylor"):
        if criterion not in CRITERIA:
            raise ValueError(
                f"MultiTaskImportance: expected criterion in {CRITERIA}, got {criterion!r}"
            )
        self.task_weights = None if task_weights is None else {
            str(k): float(v) for k, v in task_weights.items()
        }  # fmt: skip
        self.criterion = criterion
        self.needs_closure = criterion == "taylor"

    def loss(self, losses) -> torch.Tensor:
        """``sum_t w_t L_t`` of a ``{task: 0-d loss}`` dict; refuses missing or unknown tasks."""
        if not isinstance(losses, dict) or not losses:
            raise TypeError(
                f"MultiTaskImportance: expected the closure to return {{task: loss}}, got "
                f"{type(losses).__name__}"
            )
        if self.task_weights is not None and set(losses) != set(self.task_weights):
            raise ValueError(
                f"MultiTaskImportance: expected losses for tasks {sorted(self.task_weights)}, "
                f"got {sorted(losses)}"
            )
        w = self.task_weights or {}
        return sum(w.get(k, 1.0) * v for k, v in losses.items())

    def __call__(self, layers, closure=None):
        if self.criterion == "magnitude":
            return MagnitudeImportance()(layers)
        return TaylorImportance()(layers, None if closure is None else lambda: self.loss(closure()))

    def config(self) -> dict:
        return {"type": "MultiTaskImportance", "task_weights": self.task_weights,
                "criterion": self.criterion}  # fmt: skip


class LowRankLinear(nn.Module):
    """``y = x B^T A^T + bias``: a linear layer as rank-``r`` factors ``A [out, r]``,
    ``B [r, in]`` (``r (in + out)`` weights instead of ``in * out``). Input ``[..., in]``.
    :class:`MultiTaskPruner` builds them balanced: ``A = U_r sqrt(S_r)``,
    ``B = sqrt(S_r) V_r^T``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.b = nn.Parameter(b.clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def rank(self) -> int:
        return self.b.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.b.t()) @ self.a.t()
        return y if self.bias is None else y + self.bias


class MultiTaskPruner(ImportancePruner):
    """Prune a shared encoder for several tasks at once, under a parameter budget.

    Lifecycle (element-wise)::

        pruner = MultiTaskPruner(encoder, opt, budget=20_000, task_weights={"a": 1, "b": 0.5})
        closure = lambda: {"a": F.cross_entropy(head_a(encoder(x)), ya),
                           "b": F.cross_entropy(head_b(encoder(x)), yb)}
        pruner.prune(closure=closure)       # exactly 20,000 encoder weights stay
        ... fine-tune on sum_t w_t L_t: opt.step(); pruner.step()

    Rank-wise (``mode="rank"``, linear layers only): ``prune(closure=...)`` replaces each layer by a
    :class:`LowRankLinear` in the model (build a new optimizer afterwards) and returns
    ``{layer: rank}``; the factors' weights sum to at most ``budget``, and no further component
    would fit.

    Deviations: the seed abstract prunes a pretrained language model; this is the mechanism on any
    encoder. Element-wise scores are one-shot first-order Taylor on the batch the closure gives
    (call ``prune`` again with a schedule for iterative pruning); rank-wise components are chosen
    greedily by score per parameter (a knapsack heuristic) with at least rank 1 per layer.

    Args:
        model: the encoder (or the whole multi-head model) with sparse layers.
        optimizer: as in :class:`BasePruner`.
        budget: weights of the pruned layers that stay (int). Or give ``sparsity``.
        task_weights: ``{task: w_t}`` of the multi-task loss (default 1 each; the closure's
            keys must match when given).
        criterion: ``"taylor"`` (default) or ``"magnitude"``.
        mode: ``"element"`` (default) or ``"rank"``.
        min_density, layers, schedule, regularization, reg_strength: see
            :class:`ImportancePruner` (element-wise only; ``scope`` is global: one budget).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        budget: int | None = None,
        task_weights: dict[str, float] | None = None,
        criterion: str = "taylor",
        mode: str = "element",
        min_density: float | None = None,
        **base,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"MultiTaskPruner: expected mode in {MODES}, got {mode!r}")
        if budget is not None and base.get("sparsity") is not None:
            raise ValueError("MultiTaskPruner: expected budget or sparsity, got both")
        super().__init__(
            model,
            optimizer,
            importance=MultiTaskImportance(task_weights, criterion),
            scope="global",
            min_density=min_density,
            **base,
        )
        total = sum(m.weight.numel() for m in self.layers.values())
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int) or not 0 < budget <= total:
                raise ValueError(
                    f"MultiTaskPruner: expected budget an int in [1, {total}] (the layers' "
                    f"weights), got {budget!r}"
                )
            self.sparsity = 1.0 - budget / total
        self.budget = budget
        self.mode = mode
        if mode == "rank":
            bad = [n for n, m in self.layers.items() if m.weight.dim() != 2]
            if bad:
                raise ValueError(
                    f"MultiTaskPruner: expected linear layers for mode='rank', got {bad} (pass "
                    "layers=[...] the linear ones)"
                )
        self.ranks: dict[str, int] = {}

    def _budget(self) -> int:
        total = sum(m.weight.numel() for m in self.layers.values())
        if self.budget is not None:
            return self.budget
        s = self._default_target()
        return round((1.0 - s) * total)

    def prune(self, sparsity=None, closure: Callable | None = None) -> dict:
        """Element-wise: as :meth:`BasePruner.prune` (``sparsity`` overrides the budget).
        Rank-wise: factorize every layer under the budget; returns ``{layer: rank}``."""
        if self.mode == "element":
            if sparsity is None and self.budget is not None:
                sparsity = self.sparsity
            return super().prune(sparsity, closure)
        if self.ranks:
            raise ValueError("MultiTaskPruner.prune: the layers are already factorized")
        budget = self._budget() if sparsity is None else round(
            (1 - float(sparsity)) * sum(m.weight.numel() for m in self.layers.values())
        )  # fmt: skip
        chosen = self.choose_components(budget, closure)
        self._factorize(chosen)
        return dict(self.ranks)

    @torch.no_grad()
    def _svd(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return {n: torch.linalg.svd(m.weight.detach().double(), full_matrices=False)
                for n, m in self.layers.items()}  # fmt: skip

    def component_scores(self, closure: Callable | None = None) -> dict[str, torch.Tensor]:
        """``{layer: [min(out, in)] scores}`` of each SVD component: ``|s_i u_i^T G v_i|``
        (taylor, ``G`` the dense gradient of the multi-task loss) or ``s_i`` (magnitude)."""
        svd = self._svd()
        imp = self.importance
        if imp.criterion == "magnitude":
            return {n: s for n, (_, s, _) in svd.items()}
        if closure is None:
            raise ValueError("MultiTaskPruner.prune: criterion='taylor' needs a closure, got None")
        grads = dense_weight_grads(self.layers, lambda: imp.loss(closure()))
        out = {}
        for n, (u, s, vh) in svd.items():
            g = grads[n].double()
            out[n] = (s * torch.einsum("oi,or,ri->r", g, u, vh)).abs()
        return out

    def choose_components(self, budget: int, closure=None) -> dict[str, torch.Tensor]:
        """``{layer: indices of the kept SVD components}``: first the best component of every
        layer (rank >= 1), then by score per parameter while it fits ``budget``."""
        scores = self.component_scores(closure)
        cost = {n: sum(m.weight.shape) for n, m in self.layers.items()}
        floor = sum(cost.values())
        if budget < floor:
            raise ValueError(
                f"MultiTaskPruner: expected a budget >= {floor} (rank 1 in every layer), got "
                f"{budget}"
            )
        kept = {n: [int(torch.argmax(s))] for n, s in scores.items()}
        left = budget - floor
        cand = [
            (float(s[i]) / cost[n], n, i)
            for n, s in scores.items()
            for i in range(s.numel())
            if i != kept[n][0]
        ]
        for _, n, i in sorted(cand, key=lambda c: (-c[0], c[1], c[2])):
            if cost[n] <= left:
                kept[n].append(i)
                left -= cost[n]
        return {n: torch.tensor(sorted(v)) for n, v in kept.items()}

    @torch.no_grad()
    def _factorize(self, chosen: dict[str, torch.Tensor]) -> None:
        svd = self._svd()
        for n, idx in chosen.items():
            u, s, vh = svd[n]
            m = self.layers[n]
            dt = m.weight.dtype
            # balanced factors (sqrt(s) on each side): with s on one side only, the two factors'
            # gradients differ in scale by s_i and SGD fine-tuning diverged on LeNet-300-100
            root = s[idx].sqrt()
            a = (u[:, idx] * root).to(dt)
            b = (root[:, None] * vh[idx]).to(dt)
            low = LowRankLinear(a, b, m.bias).to(m.weight.device)
            parent, _, leaf = n.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, leaf, low)
            self.ranks[n] = int(idx.numel())
        self.optimizer = None  # it holds the replaced weights: build a new one
        self.rounds += 1
        self.history.append({"step": self.steps, "round": self.rounds, "ranks": dict(self.ranks),
                             "params": self.factor_params()})  # fmt: skip

    def factor_params(self) -> int:
        """Weights in the low-rank factors (``sum_l r_l (in_l + out_l)``)."""
        return sum(r * sum(self.layers[n].weight.shape) for n, r in self.ranks.items())

    def kept_fractions(self) -> dict[str, float]:
        if not self.ranks:
            return super().kept_fractions()
        return {
            n: r * sum(self.layers[n].weight.shape) / self.layers[n].weight.numel()
            for n, r in self.ranks.items()
        }

    def current_sparsity(self) -> float:
        if not self.ranks:
            return super().current_sparsity()
        return 1.0 - self.factor_params() / sum(m.weight.numel() for m in self.layers.values())

    def _config(self) -> dict:
        return {**super()._config(), "budget": self.budget, "mode": self.mode}

    def _extra_state(self) -> dict:
        return {"ranks": dict(self.ranks)}
