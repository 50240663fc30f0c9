"""GaP, scheduled grow-and-prune (Ma et al. 2022, "Effective Model Sparsification by Scheduled
Grow-and-Prune Methods"): sparsify without a dense pre-trained model. The layers are split into
``k`` groups; training starts sparse (every layer at the target); then cyclically one group is made
dense ("grow": its pruned weights return, at zero), trained for ``interval`` steps, and pruned back
to the target by magnitude while the next group grows. At ``end_step`` the last dense group is
pruned back and every mask stays fixed for fine-tuning. Each layer holds its target sparsity
whenever it is not the dense group's, so the model is at the target except for one group.

Choices where the paper leaves them to the setup: the groups are consecutive runs of the pruned
layers in model order, as equal in weight count as the order allows (the paper partitions ResNet
and Transformer layers into consecutive blocks, k = 4 for ResNet-50); the initial masks are the
magnitude masks of the initial weights; grown weights start at zero with zero optimizer state
(``set_mask``), which is what a pruned weight of the paper's masked model holds.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.pruning._common import topk_mask
from sparsekern.pruning.base import BasePruner, Closure
from sparsekern.pruning.importance import check_finite

__all__ = ["GaPPruner", "partition_layers"]


def partition_layers(layers: dict[str, nn.Module], k: int) -> list[list[str]]:
    """Split ``layers`` (in order) into ``min(k, len(layers))`` consecutive non-empty groups whose
    weight counts are as equal as the order allows (greedy on the cumulative count)."""
    names = list(layers)
    k = min(k, len(names))
    sizes = [layers[n].weight.numel() for n in names]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(k)]
    acc, g = 0, 0
    for i, (n, s) in enumerate(zip(names, sizes)):
        left_layers, left_groups = len(names) - i, k - g
        # move to the next group when this one has its share, or when each later group needs one
        if groups[g] and (acc >= total * (g + 1) / k or left_layers < left_groups):
            g += 1
        groups[g].append(n)
        acc += s
    return groups


class GaPPruner(BasePruner):
    """Scheduled grow-and-prune: sparse from the start, one group of layers dense at a time,
    cyclically, each pruned back by magnitude after ``interval`` steps.

    Lifecycle::

        pruner = GaPPruner(model, opt, sparsity=0.9, interval=len(loader), total_steps=T)
        pruner.prune()                 # start sparse: every layer at 90%, group 0 dense
        for x, y in loader:
            loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
            pruner.step()              # every `interval` steps: prune the dense group, grow next
        summary = pruner.finalize()    # exactly 90% sparse

    Args:
        model, optimizer, base keywords (``layers``, ``regularization``, ``reg_strength``): see
            :class:`BasePruner`.
        sparsity: each layer's target pruned fraction (uniform, as in the paper's uniform runs).
        interval: steps each group stays dense (the paper: a few epochs per phase).
        groups: k, the number of groups (default 4, the paper's ResNet-50 partition), or the
            groups themselves as lists of layer names covering every pruned layer once.
        total_steps: optimizer steps of the whole training; default ``end_step`` is the last
            phase boundary at or before ``0.75 * total_steps`` (then fine-tuning).
        end_step: the step at which the last dense group is pruned and the masks freeze.

    Attributes:
        groups: the layer groups. dense_group: index of the group now dense (None before
            :meth:`prune` and after ``end_step``). phase: completed grow-prune phases.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sparsity: float,
        interval: int,
        groups: int | list[list[str]] = 4,
        total_steps: int | None = None,
        end_step: int | None = None,
        **base,
    ) -> None:
        super().__init__(model, optimizer, sparsity=sparsity, **base)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"GaPPruner: expected interval an integer >= 1, got {interval!r}")
        if isinstance(groups, int) and not isinstance(groups, bool):
            if groups < 1:
                raise ValueError(f"GaPPruner: expected groups >= 1, got {groups}")
            self.groups = partition_layers(self.layers, groups)
        else:
            flat = [n for g in groups for n in g]
            if sorted(flat) != sorted(self.layers) or any(not g for g in groups):
                raise ValueError(
                    f"GaPPruner: expected groups covering each pruned layer {list(self.layers)} "
                    f"exactly once, got {groups}"
                )
            self.groups = [list(g) for g in groups]
        if end_step is None:
            if total_steps is None or total_steps < 1:
                raise ValueError(
                    f"GaPPruner: expected total_steps >= 1 (or end_step), got {total_steps}"
                )
            end_step = max(interval, int(0.75 * total_steps) // interval * interval)
        if end_step < 1:
            raise ValueError(f"GaPPruner: expected end_step >= 1, got {end_step}")
        self.interval, self.end_step = interval, int(end_step)
        self.dense_group: int | None = None
        self.phase = 0

    @torch.no_grad()
    def _masks(self, dense: int | None) -> dict[str, torch.Tensor]:
        """Every layer at the target by magnitude (within its current mask for layers that are
        not growing), except the layers of group ``dense``, all True."""
        dense_names = set() if dense is None else set(self.groups[dense])
        masks = {}
        for n, m in self.layers.items():
            if n in dense_names:
                masks[n] = torch.ones_like(m.mask)
                continue
            check_finite(m.weight, n, "GaPPruner")
            keep = round((1.0 - self.sparsity) * m.weight.numel())
            # pruned entries (exactly 0) rank below every kept one: no needless swap on ties
            score = m.weight.detach().abs().double().masked_fill(~m.mask, -1.0)
            masks[n] = topk_mask(score, keep)
        return masks

    def compute_masks(self, sparsity: float, closure: Closure | None = None) -> dict:
        """Start of GaP: every layer at ``sparsity`` by magnitude, then group 0 dense."""
        if abs(sparsity - self.sparsity) > 1e-12:
            raise ValueError(f"GaPPruner.prune: expected sparsity {self.sparsity}, got {sparsity}")
        return self._masks(0)

    def prune(self, sparsity=None, closure: Closure | None = None) -> dict:
        """Start sparse: every layer pruned to the target by magnitude, the first group dense."""
        target = self._default_target() if sparsity is None else sparsity
        # group 0 keeps its initial weights: it is the first dense group
        self._apply(self.compute_masks(target), event="start", group=0)
        self.dense_group, self.phase = 0, 0
        return self.kept_fractions()

    def step(self, closure: Closure | None = None) -> bool:
        """Count the step; every ``interval`` steps prune the dense group back to the target by
        magnitude and grow the next one; at ``end_step`` prune it and freeze.

        Raises:
            RuntimeError: before :meth:`prune` (GaP starts sparse).
        """
        if self.rounds == 0:
            raise RuntimeError(
                "GaPPruner.step: expected prune() before training (GaP starts sparse), got "
                "step() first"
            )
        self.steps += 1
        t = self.steps
        if self.dense_group is None or (t % self.interval != 0 and t != self.end_step):
            return False
        self.phase += 1
        if t >= self.end_step:
            self.dense_group = None
            return self._apply(self._masks(None), event="final prune", phase=self.phase)
        # the dense group is pruned back by magnitude first, then the next grows (at zero)
        self._apply(self._masks(None), event="prune", group=self.dense_group, phase=self.phase)
        self.dense_group = (self.dense_group + 1) % len(self.groups)
        self._apply(self._masks(self.dense_group), event="grow", group=self.dense_group)
        return True

    def _config(self) -> dict:
        return {"groups": [list(g) for g in self.groups], "interval": self.interval,
                "end_step": self.end_step}  # fmt: skip

    def _extra_state(self) -> dict:
        return {"dense_group": self.dense_group, "phase": self.phase}

    def _load_extra_state(self, state: dict) -> None:
        self.dense_group = state["dense_group"]
        self.phase = int(state["phase"])
